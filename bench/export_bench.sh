#!/usr/bin/env bash
# Export speed, afinar vs the gguf Python package, alternated in one session on this machine:
# SmolLM2-135M (exported to an HF folder first, so both start from the same safetensors) to Q8_0
# and Q4_0, and a random 1.5B Qwen2-shaped checkpoint to Q4_0. Prints seconds and peak RSS;
# "afinar" is the export alone (--check-prompts 0, as the peer does no check), "afinar+check"
# adds the token-identity self-check (load back, greedy decoding with both models).
# Needs a release build and ../shared/bench's venv (bash ../shared/bench/setup.sh), or any venv
# with numpy, safetensors and gguf (AFINAR_BENCH_VENV; without torch the peer reads with numpy).
# EXPORT_BENCH_CHECK=0 leaves out the afinar+check runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${AFINAR_BENCH_VENV:-$HOME/.cache/afinar-bench/venv}/bin/python
BIN=target/release/afinar
W=${EXPORT_BENCH_DIR:-/tmp/afinar-export-bench}
mkdir -p "$W"
[ -d "$W/smollm2-hf" ] || "$BIN" export --to hf --dtype f32 --out "$W/smollm2-hf"
[ -d "$W/qwen2-1.5b" ] || "$PY" bench/make_random_qwen2.py "$W/qwen2-1.5b" --size 1.5b
measure() { # NAME CMD… → one line: NAME seconds peak_rss_mib
    local name=$1; shift
    /usr/bin/time -f "%e %M" -o "$W/time" "$@" > "$W/log" 2>&1 || { cat "$W/log"; exit 1; }
    read -r secs kib < "$W/time"
    echo "$name $secs s $((kib / 1024)) MiB"
}
for round in 1 2; do
    for model in smollm2-hf:q8_0 smollm2-hf:q4_0 qwen2-1.5b:q4_0; do
        m=${model%%:*}; d=${model##*:}
        # Both tools start from the checkpoint in the page cache (the first one run would
        # otherwise pay for the disk reads, e.g. after the check below evicted it).
        cat "$W/$m"/*.safetensors > /dev/null
        rm -f "$W/out.gguf"
        measure "round$round $m $d afinar" "$BIN" export --model "$W/$m" --to gguf --dtype "$d" \
            --out "$W/out.gguf" --overwrite --force --check-prompts 0
        rm -f "$W/out.gguf"
        if [ "${EXPORT_BENCH_CHECK:-1}" = 1 ]; then
            measure "round$round $m $d afinar+check" "$BIN" export --model "$W/$m" --to gguf \
                --dtype "$d" --out "$W/out.gguf" --overwrite --force
            rm -f "$W/out.gguf"
            cat "$W/$m"/*.safetensors > /dev/null
        fi
        measure "round$round $m $d gguf-py" "$PY" bench/export_peer.py "$W/$m" "$W/out.gguf" "$d"
    done
done
lscpu | grep -E "Model name|^CPU\(s\)"
