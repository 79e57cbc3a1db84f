#!/usr/bin/env bash
# GGUFs as llama.cpp's own converter writes them, read by afinar: converts each tiny family
# fixture with convert_hf_to_gguf.py from the llama.cpp source node-llama-cpp bundles
# (tests/llamacpp/node_modules/node-llama-cpp/llama/gitRelease.bundle) and compares afinar's
# last-position logits on the GGUF with those on the Hugging Face folder (`afinar score --json`).
# Manual check: needs ../shared/bench's venv and a release build. Two stand-ins the converter
# needs for these tiny fixtures: its pre-tokenizer check does not know their small vocabulary
# (told "gpt-2"), and `sentencepiece` is imported but unused for byte-level BPE (stubbed).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-$HOME/.cache/afinar-bench/venv/bin/python}
W=${W:-/tmp/afinar-converter}
rm -rf "$W" && mkdir -p "$W/stub"
git clone -q tests/llamacpp/node_modules/node-llama-cpp/llama/gitRelease.bundle "$W/llama.cpp"
echo "class SentencePieceProcessor: pass" > "$W/stub/sentencepiece.py"
cat > "$W/run.py" <<PYEOF
import sys, runpy
sys.path[:0] = ["$W/stub", "$W/llama.cpp/gguf-py", "$W/llama.cpp"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[1:]
runpy.run_path("$W/llama.cpp/convert_hf_to_gguf.py", run_name="__main__")
PYEOF
for f in qwen3 gemma3 smollm3 llama3 phi3 falcon; do
    src="$W/$f-src"
    cp -r "tests/fixtures/tiny-$f" "$src"
    # Falcon: the converter reads num_kv_heads, which transformers writes as the head count
    # even for multi-query; Phi-3: the converter takes the GPT-2 path by tokenizer_class.
    "$PY" - "$src" "$f" <<'PYEOF'
import json, sys
src, f = sys.argv[1], sys.argv[2]
if f == "falcon":
    c = json.load(open(f"{src}/config.json")); c["num_kv_heads"] = 1; json.dump(c, open(f"{src}/config.json", "w"))
if f == "phi3":
    c = json.load(open(f"{src}/tokenizer_config.json")); c["tokenizer_class"] = "GPT2Tokenizer"
    json.dump(c, open(f"{src}/tokenizer_config.json", "w"))
PYEOF
    (cd "$W/llama.cpp" && "$PY" "$W/run.py" "$src" --outfile "$W/$f.gguf" --outtype f32 >"$W/$f.log" 2>&1)
    bos=""; [ "$f" = gemma3 ] && bos="<bos>"   # the GGUF adds Gemma's BOS; the folder's tokenizer does not
    prompt="Hello, world! def fib(n):"
    a=$(./target/release/afinar score --model "tests/fixtures/tiny-$f" --prompt "$bos$prompt" --json | tail -1)
    b=$(./target/release/afinar score --model "$W/$f.gguf" --prompt "$prompt" --json | tail -1)
    "$PY" -c "
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert a['ids'] == b['ids'], (a['ids'], b['ids'])
d = max(abs(x - y) for x, y in zip(a['last_logits'], b['last_logits']))
print('$f: converter GGUF vs folder, same ids, max |Δ logits| =', d)
assert d < 1e-4" "$a" "$b"
done
