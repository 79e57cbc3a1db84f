#!/usr/bin/env bash
# Data-preparation benchmark: afinar vs the Python route, on the same machine, one after the other.
#   bash bench/data_bench.sh [VENV]      (VENV: ../shared/bench venv, default ~/.cache/afinar-bench/venv)
# 1. 100,000 chat examples (the bundled conjugation set in `messages` form, repeated).
# 2. A folder of 100,000 small text files.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-$HOME/.cache/afinar-bench/venv}
WORK=${AFINAR_BENCH_WORK:-/tmp/afinar-data-bench}
MODEL=$(./target/release/afinar info --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["source"])')
mkdir -p "$WORK"
python3 - "$WORK" <<'PY'
import json, os, sys
work = sys.argv[1]
rows = [json.loads(l) for l in open("data/conjugation/conjugation.jsonl", encoding="utf-8")]
with open(os.path.join(work, "chat100k.jsonl"), "w", encoding="utf-8") as f:
    for i in range(100_000):
        r = rows[i % len(rows)]
        f.write(json.dumps({"messages": [{"role": "user", "content": f"Conjugate ({i}): {r['input']}"},
                                         {"role": "assistant", "content": r["output"]}]}, ensure_ascii=False) + "\n")
folder = os.path.join(work, "files100k")
if not os.path.isdir(folder):
    for i in range(100_000):
        sub = os.path.join(folder, f"{i // 1000:03d}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"{i}.txt"), "w", encoding="utf-8") as f:
            f.write(f"Note {i}. " + rows[i % len(rows)]["input"] + " -> " + rows[i % len(rows)]["output"] + "\n")
PY
run_afinar() {  # prints the prepare seconds from the manifest
    rm -rf "$WORK/out"
    ./target/release/afinar data prepare --data "$1" --out "$WORK/out" --max-seq-len 256 >/dev/null 2>&1
    python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(json.dumps({"records": m["records"], "prepare_s": m["prepare_seconds"], "examples_per_s": round(m["records"]/m["prepare_seconds"],1)}))' "$WORK/out/manifest.json"
}
echo "afinar chat:  $(run_afinar "$WORK/chat100k.jsonl")"
echo "python chat:  $("$VENV/bin/python" bench/data_peer.py chat --model "$MODEL" --data "$WORK/chat100k.jsonl" 2>/dev/null | grep RESULT)"
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
echo "afinar files: $(run_afinar "$WORK/files100k")"
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
echo "python files: $("$VENV/bin/python" bench/data_peer.py files --model "$MODEL" --data "$WORK/files100k" 2>/dev/null | grep RESULT)"
