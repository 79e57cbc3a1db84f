#!/usr/bin/env python3
"""Golden values for the model families beyond Llama/Qwen2/Mistral, made by transformers and PEFT.

    ~/.cache/afinar-bench/venv/bin/python tests/golden/make_families.py

For each family it writes a small randomly-initialised checkpoint in Hugging Face layout,
tests/fixtures/tiny-<family>/ (the real model's config scaled down: Qwen3's explicit head_dim and
q/k norms, Gemma 3's six layers with a window of 8 and its own RoPE base on the sliding ones,
SmolLM3's RoPE-less 4th layer, Llama 3's rope scaling and list of end ids, Mistral's window of 8,
Phi-3's fused projections with Phi-4-mini's partial rotary and LongRoPE;
non-zero norm weights; the family's special tokens and real chat template from
tests/fixtures/templates/), a PEFT adapter with random A and B, tests/fixtures/tiny-<family>-lora/,
and tests/golden/families.json: per family the logits and greedy 16 tokens of prompts longer than
the window, the adapter's logits, PEFT's loss and dL/dB norms for a fixed batch (r=4, alpha=8, all
seven projections, A by a formula the Rust test repeats, B = 0), and chat renderings by
`apply_chat_template`.
"""
import json
import math
import os

import numpy as np
import torch
import transformers
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "fixtures")
TEMPLATES = os.path.join(FIXTURES, "templates")
# All the projection names LoRA may target (afinar's ALL_LINEAR then FUSED_LINEAR): each model
# has some of them; A's formula indexes this list.
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj",
           "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
FUSED = ["qkv_proj", "gate_up_proj"]

CORPUS = [
    "Hello, world! def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "El pingüino comió ñandú y acentos: á é í ó ú ü, ¿qué tal? ¡Olé!",
    "You are a terse assistant. Conjugate tener, preterite, yo. Tuve. What is the capital of France?",
    "Numbers 1234567 and 3.14159, dates 2026-11-28. Emoji 😀 and 中文。",
]

CONVERSATIONS = [
    ([{"role": "system", "content": "You are a terse assistant."},
      {"role": "user", "content": "Conjugate tener, preterite, yo."},
      {"role": "assistant", "content": "Tuve."},
      {"role": "user", "content": "¿Y nosotros?"}], True),
    ([{"role": "system", "content": "You are a terse assistant."},
      {"role": "user", "content": "Hi!"},
      {"role": "assistant", "content": "Hello! How can I help?"}], False),
    ([{"role": "user", "content": "What is the capital of France?"}], True),
]

PROMPTS = [
    "Hello, world! def fib(n):",
    "El pingüino comió ñandú y acentos: á é í ó ú ü, ¿qué tal? You are a terse assistant.",
]

# family: (special tokens, bos, eos, template file, extra end tokens)
SPECIALS = {
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], None, "<|im_end|>", "qwen3.jinja"),
    "gemma3": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<end_of_turn>", "gemma3.jinja"),
    "smollm3": (["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], None, "<|im_end|>", "smollm3.jinja"),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"], "<|begin_of_text|>", "<|eot_id|>", "llama3.jinja"),
    "mistral-swa": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", None),
    "phi3": (["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|end|>", "phi3.jinja"),
    "falcon": ([">>ABSTRACT<<", ">>INTRODUCTION<<", "<|endoftext|>"], None, "<|endoftext|>", None),
}


def tokenizer(path, specials):
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator((CORPUS + [m["content"] for c, _ in CONVERSATIONS for m in c]) * 20, trainer)
    t.save(os.path.join(path, "tokenizer.json"))
    return t


def config(family, vocab, ids):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, num_hidden_layers=2, head_dim=24, tie_word_embeddings=True,
                                        rope_theta=1_000_000.0, bos_token_id=None, eos_token_id=ids["<|im_end|>"])
    if family == "gemma3":
        return transformers.Gemma3TextConfig(**common, num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32,
                                             sliding_window=8, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                                             bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
                                             pad_token_id=ids["<pad>"])
    if family == "smollm3":
        return transformers.SmolLM3Config(**common, num_hidden_layers=4, tie_word_embeddings=True, rope_theta=5_000_000.0,
                                          bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=None)
    if family == "llama3":
        return transformers.LlamaConfig(**common, num_hidden_layers=2, tie_word_embeddings=True,
                                        rope_theta=500_000.0,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                        bos_token_id=ids["<|begin_of_text|>"],
                                        eos_token_id=[ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]])
    if family == "mistral-swa":
        return transformers.MistralConfig(**common, num_hidden_layers=2, sliding_window=8, tie_word_embeddings=False,
                                          bos_token_id=ids["<s>"], eos_token_id=ids["</s>"])
    if family == "phi3":
        # Phi-4-mini's shape scaled down: partial rotary 0.75, LongRoPE, tied embeddings.
        rot = int(16 * 0.75) // 2
        return transformers.Phi3Config(**common, num_hidden_layers=2, tie_word_embeddings=True,
                                       rope_theta=10_000.0, partial_rotary_factor=0.75,
                                       original_max_position_embeddings=64, sliding_window=None,
                                       rope_scaling={"rope_type": "longrope",
                                                     "short_factor": [1.0 + 0.25 * i for i in range(rot)],
                                                     "long_factor": [2.0 + 0.5 * i for i in range(rot)]},
                                       bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|end|>"],
                                       pad_token_id=ids["<|endoftext|>"])
    if family == "falcon":
        # Falcon-7B's layout scaled down: multi-query, parallel attention, no biases, RoPE.
        return transformers.FalconConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                                         bias=False, alibi=False, layer_norm_epsilon=1e-5, max_position_embeddings=256,
                                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"])
    raise ValueError(family)


def greedy(model, ids, n):
    ids = list(ids)
    out = []
    for _ in range(n):
        nxt = int(torch.argmax(model(torch.tensor([ids])).logits[0, -1]))
        out.append(nxt)
        ids.append(nxt)
    return out


def lora_a(name, r, n_in):
    import re
    layer = int(re.search(r"\.(?:layers|h)\.(\d+)\.", name).group(1))
    mi = MODULES.index(name.rsplit(".", 1)[1])
    idx = np.arange(r * n_in, dtype=np.float64).reshape(r, n_in)
    return torch.tensor((0.02 * np.sin(0.37 * idx + 1.3 * layer + 0.7 * mi)).astype(np.float32))


def peft_gradients(model, vocab):
    torch.set_grad_enabled(True)
    m = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=MODULES))
    for name, mod in m.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            w = mod.lora_A["default"].weight
            with torch.no_grad():
                w.copy_(lora_a(name, *w.shape))
    ids = torch.tensor([[(i * 7919 + j * 104729) % (vocab - 10) + 5 for j in range(24)] for i in range(2)])
    out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    norms = {}
    for name, p in m.named_parameters():
        if "lora_B" in name:
            norms[name.replace("base_model.model.", "").replace(".default", "")] = float(p.grad.double().norm())
    torch.set_grad_enabled(False)
    m.unload()
    return {"ids": ids.tolist(), "loss": float(out.loss), "grad_norms": norms}


def family(name):
    path = os.path.join(FIXTURES, f"tiny-{name}")
    os.makedirs(path, exist_ok=True)
    specials, bos, eos, template = SPECIALS[name]
    tok = tokenizer(path, specials)
    ids = {s: tok.token_to_id(s) for s in specials}
    torch.manual_seed(sum(map(ord, name)))
    cfg = config(name, tok.get_vocab_size(), ids)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    gemma = name == "gemma3"
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight") or pname.endswith("ln_f.weight"):
                # Gemma stores the offset from 1; the others the scale itself.
                p.copy_((0.0 if gemma else 1.0) + 0.3 * torch.randn_like(p))
            elif pname.endswith("norm.bias") or pname.endswith("ln_f.bias"):
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "chat_template": None}
    if bos:
        tc["bos_token"] = bos
    if template and not os.path.exists(os.path.join(TEMPLATES, template)):
        print(f"{name}: no {template} in {TEMPLATES}; no chat template")
        template = None
    if template:
        with open(os.path.join(TEMPLATES, template)) as fh:
            tc["chat_template"] = fh.read()
    else:
        del tc["chat_template"]
    if name == "gemma3":
        tc["add_bos_token"] = True
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
        json.dump(tc, fh, ensure_ascii=False, indent=1)
    p = os.path.join(path, "generation_config.json")
    if os.path.exists(p) and name not in ("llama3", "gemma3"):
        os.remove(p)

    tokz = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    recs = []
    for text in PROMPTS:
        pid = tokz.encode(text, add_special_tokens=False)
        logits = model(torch.tensor([pid])).logits[0].float().numpy()
        recs.append({"text": text, "ids": pid, "logits": logits.tolist(), "greedy_16": greedy(model, pid, 16)})

    # An adapter with random A and B, saved by PEFT, and its logits on the first prompt.
    torch.manual_seed(7)
    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager"),
                        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=MODULES))
    with torch.no_grad():
        for pname, p in lm.named_parameters():
            if "lora_" in pname:
                p.copy_(0.1 * torch.randn_like(p))
    lm.save_pretrained(os.path.join(FIXTURES, f"tiny-{name}-lora"))
    lm.eval()
    adapter_logits = lm(torch.tensor([recs[0]["ids"]])).logits[0].float().numpy().tolist()

    grads = peft_gradients(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager"),
                           tok.get_vocab_size())
    chats = []
    if template:
        for msgs, gen in CONVERSATIONS:
            chats.append({"messages": msgs, "add_generation_prompt": gen,
                          "text": tokz.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)})
    return {"family": name, "path": f"tests/fixtures/tiny-{name}", "architecture": cfg.model_type,
            "prompts": recs, "adapter": {"path": f"tests/fixtures/tiny-{name}-lora", "logits": adapter_logits},
            "lora_grads": grads, "chat": chats}


def main():
    torch.set_grad_enabled(False)
    out = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "families": [family(f) for f in SPECIALS]}
    with open(os.path.join(HERE, "families.json"), "w") as fh:
        json.dump(out, fh, ensure_ascii=False)
    print("written", os.path.join(HERE, "families.json"))


if __name__ == "__main__":
    main()
