#!/usr/bin/env python3
"""The Python route for data preparation, timed the way afinar's `data prepare` is timed.

    python bench/data_peer.py chat  --model SmolLM2.gguf --data chat100k.jsonl
    python bench/data_peer.py files --model SmolLM2.gguf --data folder/

chat:  Hugging Face `datasets` loads the JSONL and `ds.map` applies the model's chat template and
       tokenizes (`tokenizer.apply_chat_template(messages, tokenize=True)`), the usual SFT recipe.
files: a Python loop reads every file of a folder (`Path.rglob` + `read_text`), then the fast
       tokenizer encodes them in one batch.
Prints `RESULT {json}` last. Tokenizer loading is excluded from the timings.
"""
import argparse
import json
import os
import pathlib
import time

ap = argparse.ArgumentParser()
ap.add_argument("mode", choices=["chat", "files"])
ap.add_argument("--model", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--num-proc", type=int, default=None)
args = ap.parse_args()

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
import datasets  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

d, f = os.path.split(os.path.abspath(args.model))
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
datasets.disable_caching()

t0 = time.perf_counter()
if args.mode == "chat":
    ds = datasets.load_dataset("json", data_files=args.data, split="train")
    t_load = time.perf_counter() - t0
    ds = ds.map(lambda ex: {"input_ids": tok.apply_chat_template(ex["messages"], tokenize=True, return_dict=False)},
                num_proc=args.num_proc)
    n = len(ds)
    tokens = sum(len(x) for x in ds["input_ids"])
else:
    texts = [p.read_text(encoding="utf-8") for p in sorted(pathlib.Path(args.data).rglob("*.txt"))]
    t_load = time.perf_counter() - t0
    ids = tok(texts)["input_ids"]
    n = len(texts)
    tokens = sum(len(x) for x in ids)
total = time.perf_counter() - t0
print("RESULT " + json.dumps({"mode": args.mode, "examples": n, "tokens": tokens, "load_s": round(t_load, 3),
                              "total_s": round(total, 3), "examples_per_s": round(n / total, 1),
                              "num_proc": args.num_proc, "datasets": datasets.__version__}))
