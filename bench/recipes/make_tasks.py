#!/usr/bin/env python3
"""Builds the recipe study's tasks from the bundled data: for each task a train.jsonl and a
test.jsonl whose items training never sees. Deterministic (fixed seed); standard library only.

    python3 bench/recipes/make_tasks.py OUT_DIR

Tasks (answer shape, record shape, size):
  conj-300    one word, alpaca, 300 train   Spanish conjugation; test verbs unseen in training
  conj-3000   one word, alpaca, 3,000 train the same, ten times the data
  revdict     one word, chat,   2,390 train WordNet gloss -> the word (a reverse dictionary);
                                            test words unseen
  defs        sentence, alpaca, 2,390 train word -> WordNet gloss; test words unseen
Every test set has 200 items.
"""
import json
import os
import random
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SEED = 20261206
TEST = 200


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return [json.loads(line) for line in f if line.strip()]


def write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def conjugation(out):
    rows = read("data/conjugation/conjugation.jsonl")
    verbs = sorted({r["verb"] for r in rows})
    rng = random.Random(SEED)
    test_verbs = set(rng.sample(verbs, len(verbs) // 10))
    train = [r for r in rows if r["verb"] not in test_verbs]
    test = [r for r in rows if r["verb"] in test_verbs]
    rng.shuffle(train)
    rng.shuffle(test)
    strip = lambda r: {k: r[k] for k in ("instruction", "input", "output")}
    for n in (300, 3000):
        write(f"{out}/conj-{n}/train.jsonl", [strip(r) for r in train[:n]])
        write(f"{out}/conj-{n}/test.jsonl", [strip(r) for r in test[:TEST]])


def definitions(out):
    rows = read("data/definitions/definitions.jsonl")
    rng = random.Random(SEED + 1)
    rng.shuffle(rows)
    # One item per word in the test set, and the test words never appear in training.
    test, seen = [], set()
    for r in rows:
        word = r["input"].split(" (")[0]
        if word not in seen and len(test) < TEST + 10:
            test.append(r)
            seen.add(word)
    test_words = {r["input"].split(" (")[0] for r in test}
    train = [r for r in rows if r["input"].split(" (")[0] not in test_words]
    test = test[:TEST]
    write(f"{out}/defs/train.jsonl", train)
    write(f"{out}/defs/test.jsonl", test)

    def rev(r):
        word, pos = r["input"][:-1].split(" (")
        return {"messages": [
            {"role": "user", "content": f"Which English {pos} means: {r['output']}? Answer with the word only."},
            {"role": "assistant", "content": word}]}
    write(f"{out}/revdict/train.jsonl", [rev(r) for r in train])
    write(f"{out}/revdict/test.jsonl", [rev(r) for r in test])


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    conjugation(out)
    definitions(out)
    for task in sorted(os.listdir(out)):
        d = os.path.join(out, task)
        if os.path.isdir(d) and os.path.exists(f"{d}/train.jsonl"):
            n = [sum(1 for _ in open(f"{d}/{s}.jsonl")) for s in ("train", "test")]
            print(f"{task}: {n[0]} train, {n[1]} test")


if __name__ == "__main__":
    main()
