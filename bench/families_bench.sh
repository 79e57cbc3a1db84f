#!/usr/bin/env bash
# Issue 17's speed check: a LoRA step (r=16, seven projections, 1 × 256) and greedy decoding on
# real-shaped random Qwen3-0.6B and Gemma-3-1B, afinar beside PEFT (f32 and autocast bf16) and
# transformers, alternated in one session. Needs ../shared/bench's venv. Results: stdout lines
# `RESULT …`; the summary goes to bench/families_results.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$HOME/.cache/afinar-bench/venv/bin/python}
OUT=${OUT:-/tmp/afinar-families}
mkdir -p "$OUT"
cargo build --release --quiet
lscpu | grep -E "Model name|Flags" | sed 's/Flags:.*\(avx512[a-z_0-9]*\).*/&/' | cut -c1-200
for m in qwen3-0.6b gemma3-1b; do
    [ -f "$OUT/$m/config.json" ] || "$PY" bench/families_bench.py make "$m" "$OUT/$m"
done
for m in qwen3-0.6b gemma3-1b; do
    for round in 1 2; do
        echo "== $m round $round"
        ./target/release/afinar bench train --model "$OUT/$m" --batch 1 --seq 256 --warmup 1 --steps 3 --json | tail -1
        "$PY" bench/families_bench.py lora "$OUT/$m" | tail -1
        "$PY" bench/families_bench.py lora "$OUT/$m" --autocast bf16 | tail -1
    done
    ./target/release/afinar bench infer --model "$OUT/$m" | tail -1
    "$PY" bench/families_bench.py decode "$OUT/$m" | tail -1
done
