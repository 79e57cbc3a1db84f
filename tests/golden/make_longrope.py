#!/usr/bin/env python3
"""A reference for LongRoPE past the original context (Phi-3, Phi-4-mini), from transformers.

    ~/.cache/afinar-bench/venv/bin/python tests/golden/make_longrope.py

transformers picks Phi-3's RoPE factors per forward call: the short ones while the call's
largest position is below `original_max_position_embeddings`, the long ones past it (the
attention factor applies to both). A prompt longer than that is thus rotated with the long
factors throughout; a generation with a cache that crosses it keeps the keys it cached with the
short factors and rotates every later token with the long ones.

On tests/fixtures/tiny-phi3 (original context 64) this writes tests/golden/longrope.json:
- `long`: a 80-token prompt's logits at some positions, from one forward call;
- `cached`: greedy decoding with a cache from a 56-token prompt for 16 tokens (crossing 64 at
  the 9th), with each step's logits;
- `short`: the same 56-token prompt's last logits, which still use the short factors.
tests/families.rs checks afinar's one-sequence path and its serving engine against these.
"""
import json, os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "..", "fixtures", "tiny-phi3")
TEXT = ("El pingüino comió ñandú y acentos: á é í ó ú ü, ¿qué tal? You are a terse assistant. "
        "Conjugate tener, preterite, yo: tuve. Nosotros tuvimos; ellos tuvieron. ¡Olé!")
POSITIONS = [0, 31, 63, 64, 79]


def main():
    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(PATH)
    model = AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32, attn_implementation="eager").eval()
    orig = model.config.rope_parameters["original_max_position_embeddings"]
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) >= 80, len(ids)
    ids = ids[:80]
    logits = model(torch.tensor([ids])).logits[0]
    long = {"ids": ids, "positions": POSITIONS, "logits": [logits[p].tolist() for p in POSITIONS]}

    prompt = ids[:56]
    out = model(torch.tensor([prompt]), use_cache=True)
    short_last = out.logits[0, -1].tolist()
    past, steps, gen = out.past_key_values, [], []
    nxt = int(out.logits[0, -1].argmax())
    for _ in range(16):
        gen.append(nxt)
        out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        steps.append(out.logits[0, -1].tolist())
        nxt = int(out.logits[0, -1].argmax())
    assert len(prompt) + len(gen) > orig + 1
    with open(os.path.join(HERE, "longrope.json"), "w") as fh:
        json.dump({"original_max_position_embeddings": orig, "long": long,
                   "cached": {"prompt": prompt, "greedy_16": gen, "step_logits": steps},
                   "short": {"prompt": prompt, "last_logits": short_last}}, fh)
    print("written", os.path.join(HERE, "longrope.json"), len(ids), "tokens, greedy", gen)


main()
