#!/usr/bin/env python3
"""Golden check of `afinar export --to hf`: transformers loads the merged folder afinar wrote
and its logits must equal afinar's base + adapter (checked by tests/export.rs against the JSON
written here), and its own tokenizer + chat template must give the ids afinar's training used.

1. Writes a deterministic LoRA adapter (PEFT format, rank 4, all seven projections, seed 0)
   for tests/fixtures/tiny-qwen2 to tests/fixtures/tiny-qwen2-lora/ (committed).
2. Runs `afinar export --to hf --dtype f32` on it into a temporary folder.
3. Loads that folder with transformers (AutoModelForCausalLM, AutoTokenizer), applies the chat
   template to a three-turn conversation with a system message, and records the ids, the last 16
   positions' logits, the eos token and the generation stop ids; also loads base + adapter with
   PEFT and records the largest |Δ logit| between PEFT and the merged folder.

    ~/.cache/afinar-bench/venv/bin/python tests/golden/export_hf_transformers.py [target/debug/afinar]

Writes tests/golden/export_hf.json.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BASE = os.path.join(ROOT, "tests/fixtures/tiny-qwen2")
ADAPTER = os.path.join(ROOT, "tests/fixtures/tiny-qwen2-lora")
MESSAGES = [
    {"role": "system", "content": "Eres un profesor de español."},
    {"role": "user", "content": "Conjuga «hablar» en presente."},
    {"role": "assistant", "content": "hablo, hablas, habla"},
    {"role": "user", "content": "¿Y «comer»?"},
]


def write_adapter():
    cfg = json.load(open(os.path.join(BASE, "config.json")))
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    shapes = {"self_attn.q_proj": (heads * hd, h), "self_attn.k_proj": (kv * hd, h),
              "self_attn.v_proj": (kv * hd, h), "self_attn.o_proj": (h, heads * hd),
              "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}
    r = 4
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        for name, (out, inp) in shapes.items():
            p = f"base_model.model.model.layers.{i}.{name}"
            tensors[f"{p}.lora_A.weight"] = torch.randn(r, inp, generator=g) * 0.2
            tensors[f"{p}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.2
    os.makedirs(ADAPTER, exist_ok=True)
    save_file(tensors, os.path.join(ADAPTER, "adapter_model.safetensors"))
    json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 8.0,
               "lora_dropout": 0.0, "target_modules": [s.split(".")[1] for s in shapes],
               "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
               "base_model_name_or_path": "tests/fixtures/tiny-qwen2", "inference_mode": True},
              open(os.path.join(ADAPTER, "adapter_config.json"), "w"), indent=2)


def main():
    afinar = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/debug/afinar")
    write_adapter()
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "hf")
        subprocess.run([afinar, "export", "--model", BASE, "--adapter", ADAPTER, "--to", "hf",
                        "--dtype", "f32", "--out", out], check=True, cwd=ROOT)
        tok = AutoTokenizer.from_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        enc = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
        ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
        gen = json.load(open(os.path.join(out, "generation_config.json")))
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
            base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
            peft = PeftModel.from_pretrained(base, ADAPTER).eval()
            ref = peft(torch.tensor([ids])).logits[0]
        res = {
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "messages": MESSAGES,
            "ids": ids,
            "eos_token": tok.eos_token,
            "eos_token_id": tok.eos_token_id,
            "generation_eos_token_id": gen["eos_token_id"],
            "peft_vs_merged_max_abs": float((logits - ref).abs().max()),
            # The last 16 positions (the answer's opening and the turns before it) keep the file small.
            "logits_from": len(ids) - 16,
            "logits": [[round(float(x), 6) for x in row] for row in logits[-16:]],
        }
    with open(os.path.join(HERE, "export_hf.json"), "w") as fh:
        json.dump(res, fh)
    print(f"ids {len(ids)}, eos {tok.eos_token!r}, PEFT vs merged max |Δ| {res['peft_vs_merged_max_abs']:.2e}")


if __name__ == "__main__":
    main()
