#!/usr/bin/env python3
"""The recipe study: afinar's defaults (or a variant) against TRL's defaults on the tasks that
`make_tasks.py` builds, each scored by `afinar eval` on the same 200 unseen test items.

    python3 bench/recipes/study.py run TASKS_DIR TASK afinar TAG [--set key=value ...] [-- train flags]
    python3 bench/recipes/study.py run TASKS_DIR TASK trl TAG [--trl-epochs N]
    python3 bench/recipes/study.py table TASKS_DIR

`run` trains (timing the whole training command: model load, data preparation, the loop, the
save), evaluates the adapter with greedy decoding, and appends one line to TASKS_DIR/results.jsonl.
`table` prints the results as a Markdown table. Environment: AFINAR (the binary; default
target/release/afinar), VENV_PYTHON (the bench venv's python, for TRL).
Run one job at a time on an otherwise idle machine: wall times are compared.
"""
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
AFINAR = os.environ.get("AFINAR", os.path.join(ROOT, "target", "release", "afinar"))
VENV_PYTHON = os.environ.get("VENV_PYTHON", os.path.expanduser("~/.cache/afinar-bench/venv/bin/python"))
# Answer length per task: generation budget and the headline metric.
LONG_ANSWERS = {"defs"}


def sh(cmd, log):
    print("$ " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    with open(log, "a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"failed ({rc}): see {log}")
    return time.perf_counter() - t


def load1():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def run(tasks, task, tool, tag, rest):
    d = os.path.join(tasks, task)
    out = os.path.join(tasks, "runs", f"{task}.{tool}.{tag}")
    log = out + ".log"
    if os.path.exists(out):
        sys.exit(f"{out} exists: pick another tag or remove it")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    load_before = load1()
    info = {}
    if tool == "afinar":
        cmd = [AFINAR, "train", "--model", "smollm2", "--data", f"{d}/train.jsonl", "--out", out] + rest
        wall = sh(cmd, log)
        adapter = os.path.join(out, "adapter")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            steps = [json.loads(line) for line in f if line.strip()]
        info["steps"] = max((m.get("step", 0) for m in steps), default=0)
    elif tool == "trl":
        epochs = "3"
        if rest[:1] == ["--trl-epochs"]:
            epochs = rest[1]
        cmd = [VENV_PYTHON, os.path.join(HERE, "trl_sft.py"), "--data", f"{d}/train.jsonl", "--out", out,
               "--epochs", epochs]
        wall = sh(cmd, log)
        adapter = out
        with open(log) as f:
            res = json.loads([line for line in f if line.startswith("RESULT ")][-1][7:])
        info["steps"] = res["steps"]
        info["epochs"] = res["epochs"]
    else:
        sys.exit(f"tool: afinar or trl, not {tool}")
    long = task in LONG_ANSWERS
    scores = out + ".eval.json"
    sh([AFINAR, "eval", "--model", "smollm2", "--adapter", adapter, "--data", f"{d}/test.jsonl",
        "--metrics", "loss,exact_match,chrf", "--max-new-tokens", "64" if long else "16",
        "--out", out + ".eval", "--json", scores], log)
    with open(scores) as f:
        m = json.load(f)["metrics"]
    row = {"task": task, "tool": tool, "tag": tag, "args": rest, "train_wall_s": round(wall, 1),
           "load_before": load_before, **info,
           "exact_match": m.get("exact_match"), "chrf": m.get("chrf"), "test_loss": m.get("loss")}
    with open(os.path.join(tasks, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def table(tasks):
    with open(os.path.join(tasks, "results.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    print("| task | run | settings | optimizer steps | train wall (s) | exact match | chrF | test loss |")
    print("|---|---|---|---|---|---|---|---|")
    num = lambda v, f: "–" if v is None else f.format(v)
    for r in rows:
        print(f"| {r['task']} | {r['tool']} {r['tag']} | {' '.join(r['args']) or 'defaults'} | {r.get('steps', '')} | "
              f"{r['train_wall_s']:.0f} | {num(r['exact_match'] and 100 * r['exact_match'], '{:.1f} %')} | {num(r['chrf'], '{:.1f}')} | "
              f"{num(r['test_loss'], '{:.3f}')} |")


def main():
    a = sys.argv[1:]
    if a[:1] == ["run"] and len(a) >= 5:
        run(a[1], a[2], a[3], a[4], a[5:])
    elif a[:1] == ["table"] and len(a) == 2:
        table(a[1])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
