#!/usr/bin/env python3
"""Two checks of what afinar writes for each tiny family fixture, read back by Python's own
libraries. Needs a release build and ../shared/bench's venv:

    ~/.cache/afinar-bench/venv/bin/python tests/golden/check_family_exports.py

1. `afinar export --to hf` of the fixture, loaded by transformers: the logits equal the original
   checkpoint's (the config keys and tensor names afinar writes are the family's own).
2. A LoRA adapter trained by `afinar train` (a few steps at a high rate, so that it moves the
   logits), loaded by PEFT onto the fixture: its logits equal those of afinar's own merged export
   of the same adapter (`export --adapter`), which the Rust tests hold equal to afinar's adapted
   forward. PEFT thus reads afinar's adapter (names, scaling, Falcon's names) as afinar does.
"""
import json, shutil, subprocess, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

AFINAR = "./target/release/afinar"
TEXT = "El pingüino comió ñandú y acentos: á é í ó ú ü, ¿qué tal?"


def run(*args):
    r = subprocess.run([AFINAR, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"afinar {' '.join(args)} failed:\n{r.stderr}")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


for fam in ["gemma3", "qwen3", "smollm3", "llama3", "phi3", "falcon"]:
    base = f"tests/fixtures/tiny-{fam}"
    hf = f"/tmp/fam/{fam}-hf"
    run("export", "--model", base, "--to", "hf", "--out", hf, "--overwrite", "--dtype", "f32", "--check-prompts", "0")
    tok = AutoTokenizer.from_pretrained(hf)
    ids = torch.tensor([tok.encode(TEXT, add_special_tokens=False)])
    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    m = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    d = (logits(m, ids) - logits(ref, ids)).abs().max().item()
    print(fam, type(m).__name__, "max |Δlogits| exported vs original:", d)
    assert d < 1e-4, fam

    # 2. afinar's adapter in PEFT (the default targets, all-linear, include the fused
    # projections of Phi-3 and Falcon).
    run_dir = f"/tmp/fam/{fam}-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    # Falcon-7B has no chat template: it trains on raw text.
    data = "data/gutenberg/gutenberg.jsonl" if fam == "falcon" else "data/conjugation/conjugation.jsonl"
    run("train", "--model", base, "--data", data, "--out", run_dir,
        "--max-steps", "3", "--lr", "5e-2", "--batch-size", "2", "--max-seq-len", "2048", "--quiet")
    adapter = f"{run_dir}/adapter"
    merged = f"/tmp/fam/{fam}-merged"
    run("export", "--model", base, "--adapter", adapter, "--to", "hf", "--out", merged, "--overwrite", "--dtype", "f32", "--check-prompts", "0")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    mm = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    moved = (logits(peft, ids) - logits(ref, ids)).abs().max().item()
    d = (logits(peft, ids) - logits(mm, ids)).abs().max().item()
    targets = sorted(json.load(open(f"{adapter}/adapter_config.json"))["target_modules"])
    print(fam, "PEFT loads afinar's adapter", targets, "moved logits by", round(moved, 3), "max |Δlogits| vs afinar's merge:", d)
    assert moved > 1e-2, f"{fam}: the adapter did not move the logits"
    assert d < 1e-4, fam
print("all families pass")
