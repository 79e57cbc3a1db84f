#!/usr/bin/env python3
"""Exports each tiny family fixture with `afinar export --to hf` and loads the folder with
transformers: the logits must equal the original checkpoint's (the config keys and tensor names
afinar writes are the family's own). Needs a release build and ../shared/bench's venv:

    ~/.cache/afinar-bench/venv/bin/python tests/golden/check_family_exports.py
"""
import json, subprocess, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
for fam in ["gemma3", "qwen3", "smollm3", "llama3", "phi3", "falcon"]:
    hf = f"/tmp/fam/{fam}-hf"
    subprocess.run(["./target/release/afinar", "export", "--model", f"tests/fixtures/tiny-{fam}", "--to", "hf", "--out", hf, "--overwrite", "--dtype", "f32", "--check-prompts", "0"], check=True, capture_output=True)
    tok = AutoTokenizer.from_pretrained(hf)
    m = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(f"tests/fixtures/tiny-{fam}", dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("El pingüino comió ñandú y acentos: á é í ó ú ü, ¿qué tal?", add_special_tokens=False)])
    with torch.no_grad():
        d = (m(ids).logits - ref(ids).logits).abs().max().item()
    print(fam, type(m).__name__, "max |Δlogits| exported vs original:", d)
    assert d < 1e-4, fam
