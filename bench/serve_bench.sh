#!/usr/bin/env bash
# Serving under load (issue: continuous batching), one alternated session on one machine:
# bench/serve_load.py at 1, 4, 8 and 16 concurrent clients against
#   - afinar serve (this build; the default model as it comes, bf16),
#   - OLD=path/to/afinar, when given: an earlier afinar binary (e.g. before continuous batching),
#   - llama.cpp (tests/llamacpp/serve.mjs: node-llama-cpp's prebuilt CPU llama.cpp, one context
#     with 16 parallel sequences) on the very GGUF file afinar serves (the default model comes as
#     a Q4_1 GGUF), when tests/llamacpp/node_modules is installed.
# Every server gets the same streamed, greedy 32-token chat requests; each line of the output is
# serve_load.py's RESULT with the engine and client count added.
#
#     cargo build --release && bash bench/serve_bench.sh [SECONDS] > serve_results.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-30}
BIN=${BIN:-target/release/afinar}
W=${W:-/tmp/afinar-serve-bench}
THREADS=${THREADS:-2}
mkdir -p "$W"
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores" >&2

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

wait_port() {
    for _ in $(seq 1 600); do
        python3 - "$1" <<'EOF' && return 0
import socket, sys
s = socket.socket(); s.settimeout(0.2)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
EOF
        sleep 0.5
    done
    echo "server on port $1 did not start" >&2
    return 1
}

start() { # NAME PORT: starts the server, sets PID
    case "$1" in
        afinar) "$BIN" serve --port "$2" --max-concurrent 16 --name smollm2 2>"$W/$1.log" & ;;
        afinar-old) "$OLD" serve --port "$2" --max-concurrent 16 --name smollm2 2>"$W/$1.log" & ;;
        llama.cpp) (cd tests/llamacpp && exec node serve.mjs "$GGUF" "$2" 16 "$THREADS") 2>"$W/$1.log" & ;;
    esac
    PID=$!
    PIDS+=("$PID")
    wait_port "$2"
}

ENGINES=(afinar)
[ -n "${OLD:-}" ] && ENGINES+=(afinar-old)
GGUF=$("$BIN" info --model smollm2 | sed -n 's/^source *//p')
if [ -d tests/llamacpp/node_modules ] && [[ "$GGUF" == *.gguf ]]; then
    ENGINES+=(llama.cpp)
fi

port=18300
for clients in 1 4 8 16; do
    for engine in "${ENGINES[@]}"; do
        port=$((port + 1))
        start "$engine" "$port"
        # One short warm-up request, not counted.
        python3 bench/serve_load.py --url "http://127.0.0.1:$port" --clients 1 --seconds 1 >/dev/null
        python3 bench/serve_load.py --url "http://127.0.0.1:$port" --clients "$clients" \
            --seconds "$SECONDS_PER_RUN" | sed -n 's/^RESULT //p' |
            python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r['engine']='$engine'; print(json.dumps(r))"
        kill "$PID"; wait "$PID" 2>/dev/null || true
    done
done
