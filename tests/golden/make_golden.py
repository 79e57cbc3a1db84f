#!/usr/bin/env python3
"""Golden values for afinar's model tests, produced by the Hugging Face implementation.

Run with the reference venv that ../shared/bench/setup.sh builds (torch, transformers, gguf):

    ~/.cache/afinar-bench/venv/bin/python tests/golden/make_golden.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

It writes, next to this file:
  smollm2.json          tokenizer ids, chat-template renderings, logits and greedy continuations
                        of the default model, as transformers computes them from the same GGUF;
  ../fixtures/tiny-qwen2/, ../fixtures/tiny-mistral/
                        small randomly-initialised checkpoints in Hugging Face layout (Qwen2 in
                        bf16 and sharded, Mistral in f32) with a small trained BPE tokenizer;
  tiny_models.json      their logits and greedy continuations;
  lora_grads.json       PEFT's LoRA gradients (norm of dL/dB per adapted matrix) on a fixed batch.
"""
import base64
import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "fixtures")
torch.set_grad_enabled(False)

CORPUS = [
    "Hello, world!",
    "El pingüino comió ñandú y acentos: á é í ó ú ü, ¿qué tal? ¡Olé!",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Emoji: 😀🎉👩‍💻 and flags 🇪🇸",
    "中文测试：今天天气很好。日本語もあります。",
    "Numbers 1234567 and 3.14159, dates 2026-11-28.",
    "runs   of    spaces\n\n\nand\ttabs\t\tand newlines\n",
    "  leading spaces and trailing   ",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>\n",
    "I'm sure they'll say we've done it, 'quoted' \"double\".",
    "",
    "x",
]

CONVERSATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"}], True),
    ([{"role": "system", "content": "You are a terse assistant."},
      {"role": "user", "content": "Conjugate tener, preterite, yo."}], True),
    ([{"role": "user", "content": "Hi!"},
      {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Tell me a joke about cats."}], True),
    ([{"role": "system", "content": "Eres un asistente que responde en español."},
      {"role": "user", "content": "¿Cómo estás?"},
      {"role": "assistant", "content": "¡Muy bien, gracias!"}], False),
    ([{"role": "user", "content": "Write code:\n```python\nprint('hi')\n```"}], False),
    ([{"role": "user", "content": "  spaces around  "},
      {"role": "assistant", "content": "ok"},
      {"role": "user", "content": "emoji 😀 and 中文"}], True),
]

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def add(a, b):\n    return",
]


def f32_b64(a):
    return base64.b64encode(np.asarray(a, dtype="<f4").tobytes()).decode()


def greedy(model, ids, n):
    ids = list(ids)
    out = []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        nxt = int(torch.argmax(logits))
        out.append(nxt)
        ids.append(nxt)
    return out


def logits_record(model, ids, sample_ids):
    logits = model(torch.tensor([ids])).logits[0].float().numpy()
    return {
        "ids": ids,
        "last_logits_f32_b64": f32_b64(logits[-1]),
        "sample_vocab_ids": sample_ids,
        "sampled_logits": logits[:, sample_ids].tolist(),
        "greedy_32": greedy(model, ids, 32),
    }


def smollm2(gguf):
    d, f = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    # transformers' GGUF converter gives every gpt2-kind vocabulary GPT-2's plain ByteLevel
    # pre-tokenizer. SmolLM2's own tokenizer.json (and llama.cpp's 'smollm' pre-tokenizer) first
    # splits every digit: "2026" is 4 tokens, not 2. afinar follows the model's real tokenizer, so
    # the reference here is transformers' tokenizer with that pre-tokenizer restored; the ids of
    # the unpatched converter are kept as `ids_transformers_gguf` (on this vocabulary, which has no
    # multi-digit tokens, the two happen to agree; on others they would not).
    raw_tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    from tokenizers import pre_tokenizers
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    rng = np.random.default_rng(0)
    sample_ids = sorted(set(rng.integers(0, model.config.vocab_size, 256).tolist()))
    out = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model_file": f,
        "tokenizer": [{"text": t, "ids": tok.encode(t, add_special_tokens=False),
                       "ids_with_special": tok.encode(t),
                       "ids_transformers_gguf": raw_tok.encode(t, add_special_tokens=False)} for t in CORPUS],
        "chat": [{"messages": m, "add_generation_prompt": g,
                  "text": tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g)}
                 for m, g in CONVERSATIONS],
        "logits": [logits_record(model, tok.encode(p, add_special_tokens=False), sample_ids)
                   for p in PROMPTS],
    }
    with open(os.path.join(HERE, "smollm2.json"), "w") as fh:
        json.dump(out, fh, ensure_ascii=False)


def tiny_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS * 20 + [c["content"] for m, _ in CONVERSATIONS for c in m] * 20, trainer)
    os.makedirs(path, exist_ok=True)
    t.save(os.path.join(path, "tokenizer.json"))
    return t.get_vocab_size()


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny(kind):
    path = os.path.join(FIXTURES, f"tiny-{kind}")
    vocab = tiny_tokenizer(path)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    torch.manual_seed({"qwen2": 1, "mistral": 2}[kind])
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1_000_000.0)
        model = transformers.Qwen2ForCausalLM(cfg)
        # Non-zero biases so the q/k/v bias path is really checked.
        for layer in model.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.normal_(0, 0.5)
        model = model.to(torch.bfloat16)
        model.save_pretrained(path, max_shard_size="100KB")
    else:
        cfg = transformers.MistralConfig(**common, sliding_window=4096, tie_word_embeddings=False)
        model = transformers.MistralForCausalLM(cfg)
        model.save_pretrained(path)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML}, fh)
    for extra in ("generation_config.json",):
        p = os.path.join(path, extra)
        if os.path.exists(p):
            os.remove(p)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = ["Hello, world! def fib(n):", "<|im_start|>user\n¿qué tal?<|im_end|>\n"]
    recs = []
    for p in prompts:
        ids = tok.encode(p, add_special_tokens=False)
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
        recs.append({"text": p, "ids": ids, "logits": logits.tolist(), "greedy_16": greedy(model, ids, 16)})
    return {"path": f"tests/fixtures/tiny-{kind}", "architecture": kind, "prompts": recs,
            "chat": tok.apply_chat_template(CONVERSATIONS[2][0], tokenize=False, add_generation_prompt=True)}


MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_grads(gguf):
    """dL/dB of every LoRA matrix (PEFT, r=8, alpha=16, all seven projections, B = 0, A given by a
    formula afinar's test reproduces) on a fixed 2x24 batch, loss = mean CE over all next tokens."""
    from peft import LoraConfig, get_peft_model
    d, f = os.path.split(os.path.abspath(gguf))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    torch.set_grad_enabled(True)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=MODULES))
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            layer = int(name.split(".layers.")[1].split(".")[0])
            mi = MODULES.index(name.rsplit(".", 1)[1])
            w = mod.lora_A["default"].weight
            r, n_in = w.shape
            idx = np.arange(r * n_in, dtype=np.float64).reshape(r, n_in)
            a = 0.02 * np.sin(0.37 * idx + 1.3 * layer + 0.7 * mi)
            with torch.no_grad():
                w.copy_(torch.tensor(a.astype(np.float32)))
    ids = torch.tensor([[(i * 7919 + j * 104729) % 49000 + 100 for j in range(24)] for i in range(2)])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    norms = {}
    for name, p in model.named_parameters():
        if "lora_B" in name:
            key = name.replace("base_model.model.", "").replace(".default", "")
            norms[key] = float(p.grad.double().norm())
    torch.set_grad_enabled(False)
    with open(os.path.join(HERE, "lora_grads.json"), "w") as fh:
        json.dump({"versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                   "rank": 8, "alpha": 16, "ids": ids.tolist(), "loss": float(out.loss), "grad_norms": norms}, fh, indent=0)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    lora_grads(sys.argv[1])
    smollm2(sys.argv[1])
    tiny_out = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                "models": [tiny("qwen2"), tiny("mistral")]}
    with open(os.path.join(HERE, "tiny_models.json"), "w") as fh:
        json.dump(tiny_out, fh, ensure_ascii=False)
    print("written", HERE)


if __name__ == "__main__":
    main()
