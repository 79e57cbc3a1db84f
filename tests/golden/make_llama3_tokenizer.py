#!/usr/bin/env python3
"""A reference for Llama 3's real tokenizer, from Meta's own code and file.

    ~/.cache/afinar-bench/venv/bin/pip install tiktoken    # once
    ~/.cache/afinar-bench/venv/bin/python tests/golden/make_llama3_tokenizer.py

Meta's `llama-models` wheel on PyPI carries Llama 3's tokenizer (`llama_models/llama3/
tokenizer.model`, tiktoken's format: base64 bytes and rank per line); Hugging Face, where the
`tokenizer.json` lives, is unreachable from here. This script fetches that wheel with pip and
encodes a varied corpus the way `llama_models/llama3/tokenizer.py` does (tiktoken with Meta's
pre-tokenizer pattern and its 256 special tokens), writing tests/golden/llama3_tokenizer.json:
the wheel's name and the file's SHA-256, the special tokens, and for each text its ids without
and with BOS. Nothing of Meta's vocabulary is stored in the repository; tests/families.rs
fetches the same wheel, builds a GGUF vocabulary from it as llama.cpp's converter lays one out,
and checks afinar's ids and llama.cpp's against these.
"""
import base64, glob, hashlib, json, os, subprocess, sys, tempfile, zipfile

import tiktoken

WHEEL = "llama-models==0.3.0"
MEMBER = "llama_models/llama3/tokenizer.model"
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "llama3_tokenizer.json")

# Copied from llama_models/llama3/tokenizer.py (0.3.0).
PAT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
         "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
         "<|python_tag|>", "<|image|>"]

CORPUS = [
    "Hello, world!",
    "This is a test sentence.",
    "El pingüino comió ñandú y acentos: á é í ó ú ü, ¿qué tal? ¡Olé!",
    "Conjugate the Spanish verb.\n\nverb: tener; tense: preterite; person: nosotros",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Numbers 1234567, 3.14159, 2026-12-06 and 000123",
    "I'VE DON'T you'll we'd SHE'S they're it's",
    "runs   of    spaces\n\n\nand\ttabs\t\t and \r\n windows lines",
    "  leading spaces and trailing   ",
    "Emoji 😀🎉👍🏽 and 中文字符, 日本語のテキスト, 한국어, Ελληνικά, русский, العربية, हिन्दी",
    "Math: ∑_{i=1}^{n} x_i² ≤ ∞; arrows → ⇒ and ‘quotes’ “double” «guillemets»",
    "URLs https://example.com/a?b=c&d=e#f and e-mail someone@example.org",
    "Zero-width\u200bjoiner\u200d and combining e\u0301 vs é",
    "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>",
    "x",
    "",
]


def fetch():
    d = tempfile.mkdtemp()
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:", "-d", d, WHEEL], check=True)
    wheel = glob.glob(os.path.join(d, "*.whl"))[0]
    return os.path.basename(wheel), zipfile.ZipFile(wheel).read(MEMBER)


def main():
    wheel, data = fetch()
    ranks = {}
    for line in data.decode().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    n = len(ranks)
    names = NAMED + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(NAMED))]
    special = {t: n + i for i, t in enumerate(names)}
    enc = tiktoken.Encoding(name="llama3", pat_str=PAT, mergeable_ranks=ranks, special_tokens=special)
    bos = special["<|begin_of_text|>"]
    cases = []
    for text in CORPUS:
        # afinar, like transformers, matches special-token text whole: allow all of them.
        ids = enc.encode(text, allowed_special="all")
        assert enc.decode(ids) == text
        cases.append({"text": text, "ids": ids, "ids_with_bos": [bos] + ids})
    out = {
        "wheel": wheel,
        "member": MEMBER,
        "sha256": hashlib.sha256(data).hexdigest(),
        "base_tokens": n,
        "special_tokens": names,
        "bos": bos,
        "eot": special["<|eot_id|>"],
        "tokenizer": cases,
    }
    with open(OUT, "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print(f"wrote {OUT}: {len(cases)} texts, {n} base tokens, {len(names)} special")


main()
