#!/usr/bin/env python3
"""Writes a Qwen2-shaped checkpoint with random weights (bf16 safetensors, config.json and the
tiny fixture's tokenizer) for export and base-weight benchmarks:
`make_random_qwen2.py OUT_DIR [--size 1.5b|0.5b|mistral-7b]` (mistral-7b: Mistral-7B's shape,
Llama layout without biases, untied head, the tiny Mistral fixture's tokenizer; always numpy).
Not committed: 3 GB at 1.5B. Uses torch + safetensors when installed (../shared/bench's venv has
them), else numpy alone (other random values, same shapes and format), written tensor by tensor."""
import json, os, shutil, sys

import numpy as np
try:
    import torch
    from safetensors.torch import save_file
except ImportError:
    torch = None

SIZES = {
    # DeepSeek-R1-Distill-Qwen-1.5B / Qwen2.5-1.5B shapes.
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    # Mistral-7B-v0.1 shapes.
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
}

def main():
    out = sys.argv[1]
    size = sys.argv[sys.argv.index("--size") + 1] if "--size" in sys.argv else "1.5b"
    s = SIZES[size]
    here = os.path.dirname(os.path.abspath(__file__))
    mistral = size.startswith("mistral")
    fixture = os.path.join(here, "..", "tests", "fixtures", "tiny-mistral" if mistral else "tiny-qwen2")
    os.makedirs(out, exist_ok=True)
    cfg = json.load(open(os.path.join(fixture, "config.json")))
    cfg.update(s, max_position_embeddings=4096, tie_word_embeddings=not mistral, torch_dtype="bfloat16")
    cfg.pop("dtype", None)
    if mistral:
        cfg["head_dim"] = s["hidden_size"] // s["num_attention_heads"]
    cfg["layer_types"] = ["full_attention"] * s["num_hidden_layers"]
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(fixture, f), out)
    h, i, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    hd = h // s["num_attention_heads"]
    kv = hd * s["num_key_value_heads"]
    if torch is None or mistral:
        return numpy_checkpoint(out, s, h, i, v, kv, bias=not mistral, tied=not mistral)
    g = torch.Generator().manual_seed(0)
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

def shapes(s, h, i, v, kv, bias=True, tied=True):
    """Every tensor's (name, shape, random?) in the checkpoint, in name order."""
    t = [("model.embed_tokens.weight", (v, h), True), ("model.norm.weight", (h,), False)]
    if not tied:
        t.append(("lm_head.weight", (v, h), True))
    for l in range(s["num_hidden_layers"]):
        p = f"model.layers.{l}."
        t += [(p + "self_attn.q_proj.weight", (h, h), True), (p + "self_attn.q_proj.bias", (h,), True),
              (p + "self_attn.k_proj.weight", (kv, h), True), (p + "self_attn.k_proj.bias", (kv,), True),
              (p + "self_attn.v_proj.weight", (kv, h), True), (p + "self_attn.v_proj.bias", (kv,), True),
              (p + "self_attn.o_proj.weight", (h, h), True),
              (p + "mlp.gate_proj.weight", (i, h), True), (p + "mlp.up_proj.weight", (i, h), True),
              (p + "mlp.down_proj.weight", (h, i), True),
              (p + "input_layernorm.weight", (h,), False),
              (p + "post_attention_layernorm.weight", (h,), False)]
    if not bias:
        t = [x for x in t if not x[0].endswith(".bias")]
    return sorted(t)

def numpy_checkpoint(out, s, h, i, v, kv, bias=True, tied=True):
    """The checkpoint without torch: N(0, 0.02²) values rounded to bf16 (nearest even), the
    safetensors header written first, then each tensor."""
    rng = np.random.default_rng(0)
    t = shapes(s, h, i, v, kv, bias, tied)
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in t:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name, shape, random in t:
            if not random:
                f.write(np.full(shape, 0x3F80, dtype=np.uint16).tobytes())
                continue
            x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).view(np.uint32)
            f.write(((x + 0x7FFF + ((x >> 16) & 1)) >> 16).astype(np.uint16).tobytes())
    n = sum(int(np.prod(shape)) for _, shape, _ in t)
    print(f"wrote {out}: {n / 1e9:.2f} B parameters (numpy)")

main()
