#!/usr/bin/env python3
"""Writes a Qwen2-shaped checkpoint with random weights (bf16 safetensors, config.json and the
tiny fixture's tokenizer) for export benchmarks: `make_random_qwen2.py OUT_DIR [--size 1.5b]`.
Not committed: 3 GB at 1.5B. Needs torch + safetensors (../shared/bench's venv has them)."""
import json, os, shutil, sys

import torch
from safetensors.torch import save_file

SIZES = {
    # DeepSeek-R1-Distill-Qwen-1.5B / Qwen2.5-1.5B shapes.
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
}

def main():
    out = sys.argv[1]
    size = sys.argv[sys.argv.index("--size") + 1] if "--size" in sys.argv else "1.5b"
    s = SIZES[size]
    here = os.path.dirname(os.path.abspath(__file__))
    fixture = os.path.join(here, "..", "tests", "fixtures", "tiny-qwen2")
    os.makedirs(out, exist_ok=True)
    cfg = json.load(open(os.path.join(fixture, "config.json")))
    cfg.update(s, max_position_embeddings=4096, tie_word_embeddings=True, torch_dtype="bfloat16")
    cfg.pop("dtype", None)
    cfg["layer_types"] = ["full_attention"] * s["num_hidden_layers"]
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(fixture, f), out)
    g = torch.Generator().manual_seed(0)
    h, i, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    hd = h // s["num_attention_heads"]
    kv = hd * s["num_key_value_heads"]
    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
    t = {"model.embed_tokens.weight": r(v, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for l in range(s["num_hidden_layers"]):
        p = f"model.layers.{l}."
        t.update({
            p + "self_attn.q_proj.weight": r(h, h), p + "self_attn.q_proj.bias": r(h),
            p + "self_attn.k_proj.weight": r(kv, h), p + "self_attn.k_proj.bias": r(kv),
            p + "self_attn.v_proj.weight": r(kv, h), p + "self_attn.v_proj.bias": r(kv),
            p + "self_attn.o_proj.weight": r(h, h),
            p + "mlp.gate_proj.weight": r(i, h), p + "mlp.up_proj.weight": r(i, h),
            p + "mlp.down_proj.weight": r(h, i),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        })
    save_file(t, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    n = sum(x.numel() for x in t.values())
    print(f"wrote {out}: {n / 1e9:.2f} B parameters")

main()
