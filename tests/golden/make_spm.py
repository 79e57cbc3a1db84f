#!/usr/bin/env python3
"""A reference for afinar's SentencePiece (`tokenizer.ggml.model = llama`) tokenizer path.

    ~/.cache/afinar-bench/venv/bin/python tests/golden/make_spm.py

Writes tests/fixtures/tiny-spm.gguf: a one-layer random llama model whose vocabulary is laid out
as SentencePiece GGUFs are (<unk>, <s>, </s>, the 256 byte tokens <0x00>..<0xFF> with type BYTE,
then `▁`-marked pieces scored by merge rank; scores, token types, add_space_prefix), the pieces
from a SentencePiece-style BPE trained on a varied corpus. And tests/golden/spm.json: the ids
transformers' own GGUF tokenizer converter gives for that corpus (with BOS). tests/families.rs
checks afinar's ids against these and against llama.cpp's tokenizer on the same file.
"""
import json
import os

import numpy as np
import gguf
from tokenizers import SentencePieceBPETokenizer
from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "tiny-spm.gguf")

TRAIN = [
    "Hello, world! The capital of France is Paris.",
    "El pingüino comió ñandú y acentos: á é í ó ú ü, ¿qué tal? ¡Olé!",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Conjugate tener, preterite, yo: tuve. Nosotros tuvimos.",
] * 30

CORPUS = [
    "Hello, world!",
    "El pingüino comió ñandú y acentos: á é í ó ú ü, ¿qué tal? ¡Olé!",
    "def fib(n):\n    if n < 2:\n        return n\n",
    "Emoji 😀🎉 and 中文 fall back to bytes",
    "runs   of    spaces\n\n\nand\ttabs",
    "  leading spaces and trailing   ",
    "Numbers 1234567 and 3.14159",
    "x",
    "",
]


def main():
    spm = SentencePieceBPETokenizer(add_prefix_space=True)
    spm.train_from_iterator(TRAIN, vocab_size=300, min_frequency=2, special_tokens=[], show_progress=False)
    model = json.loads(spm.to_str())["model"]
    # Pieces in merge order: the initial alphabet first, then each merge's result.
    pieces = []
    for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        if p not in pieces:
            pieces.append(p)
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(6)
    for rank, p in enumerate(pieces):
        if p in tokens:
            continue
        tokens.append(p)
        scores.append(-float(rank))
        types.append(1)
    n_vocab, hidden, ff = len(tokens), 8, 16
    w = gguf.GGUFWriter(OUT, "llama")
    w.add_name("tiny-spm")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(hidden // 2)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    rng = np.random.default_rng(0)
    t = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)
    w.add_tensor("token_embd.weight", t(n_vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for name, shape in [("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                        ("attn_k", (hidden, hidden)), ("attn_v", (hidden, hidden)), ("attn_output", (hidden, hidden)),
                        ("ffn_gate", (ff, hidden)), ("ffn_up", (ff, hidden)), ("ffn_down", (hidden, ff))]:
        w.add_tensor(f"blk.0.{name}.weight", np.ones(shape, np.float32) if len(shape) == 1 else t(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    d, f = os.path.split(os.path.abspath(OUT))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    out = {"file": "tests/fixtures/tiny-spm.gguf", "vocab": n_vocab,
           "tokenizer": [{"text": c, "ids": tok.encode(c)} for c in CORPUS]}
    with open(os.path.join(HERE, "spm.json"), "w") as fh:
        json.dump(out, fh, ensure_ascii=False, indent=0)
    print("written", OUT, n_vocab, "tokens")


if __name__ == "__main__":
    main()
