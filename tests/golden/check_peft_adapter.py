#!/usr/bin/env python3
"""Loads an adapter trained by `afinar train` with Python PEFT and checks its logits against
afinar's own (`afinar score --json`): max |Δ logits| ≤ 1e-3 on a few prompts.

    ~/.cache/afinar-bench/venv/bin/python tests/golden/check_peft_adapter.py \
        ~/.cache/afinar/models/SmolLM2-135M-Instruct.Q4_1.gguf runs/conjugation/adapter [target/release/afinar]
"""
import json
import os
import subprocess
import sys

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "<|im_start|>user\nConjugate the Spanish verb.\n\nverb: tener; tense: preterite; person: yo<|im_end|>\n<|im_start|>assistant\n",
    "The capital of France is",
    "def add(a, b):\n    return a + b",
]


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    gguf, adapter = sys.argv[1], sys.argv[2]
    afinar = sys.argv[3] if len(sys.argv) > 3 else "target/release/afinar"
    d, f = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    base = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter).eval()
    worst = 0.0
    for p in PROMPTS:
        out = json.loads(subprocess.run([afinar, "score", "--model", gguf, "--adapter", adapter, "--prompt", p, "--json"],
                                        check=True, capture_output=True, text=True).stdout)
        ids = out["ids"]
        assert ids == tok.encode(p), f"token ids differ for {p!r}"
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1].numpy()
        diff = float(np.abs(ref - np.array(out["last_logits"], dtype=np.float32)).max())
        worst = max(worst, diff)
        print(f"max |Δ logits| = {diff:.2e}  ({len(ids)} tokens)")
    print(json.dumps({"max_abs_diff": worst, "ok": worst <= 1e-3}))
    sys.exit(0 if worst <= 1e-3 else 1)


if __name__ == "__main__":
    main()
