#!/usr/bin/env python3
"""PEFT beside afinar on real-shaped random models of the new families (issue 17):

    families_bench.py make qwen3-0.6b|gemma3-1b OUT_DIR    write the checkpoint (bf16 safetensors,
                                                           the real config, random weights, the tiny
                                                           fixture's tokenizer); not committed
    families_bench.py lora DIR [--autocast bf16] [--batch B --seq S --warmup W --steps N]
    families_bench.py decode DIR [--new-tokens N]

`lora` times PEFT's LoRA step exactly as ../shared/bench/peft_baseline.py does (r=16, alpha 32,
the seven projections, AdamW lr 2e-4, random ids from torch seed 1, labels = ids), but loads a
Hugging Face folder instead of a GGUF, which those families need (transformers' GGUF reader
lacks some). `decode` times greedy `generate` after a 32-token prompt (seed 7). Each prints a
`RESULT {json}` line last. bench/families_bench.sh runs both tools alternated.
"""
import argparse, json, os, statistics, sys, time

SHAPES = {
    # Qwen/Qwen3-0.6B's config.json.
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True),
    # google/gemma-3-1b-it's config.json.
    "gemma3-1b": dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                      max_position_embeddings=32768, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                      sliding_window=512, query_pre_attn_scalar=256, rms_norm_eps=1e-6),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make(name, out):
    import shutil
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    s = dict(SHAPES[name])
    cfg = AutoConfig.for_model(s.pop("model_type"), **s)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                           "tiny-qwen3" if name.startswith("qwen3") else "tiny-gemma3")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(fixture, f), os.path.join(out, f))
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()):,} parameters")


def lora(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32)
    load_s = time.perf_counter() - t
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                             task_type="CAUSAL_LM", target_modules=TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    import contextlib
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.autocast == "bf16" else contextlib.nullcontext
    steps = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with autocast():
            out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        print(f"{'warmup' if i < args.warmup else 'step'} {i}: {dt * 1000:.0f} ms loss {out.loss.item():.4f}", flush=True)
        if i >= args.warmup:
            steps.append(dt)
    med = statistics.median(steps)
    print("RESULT " + json.dumps({"tool": "peft", "mode": "lora", "autocast": args.autocast, "load_s": round(load_s, 1),
                                  "tokens_per_s": round(args.batch * args.seq / med, 1), "step_median_s": round(med, 3),
                                  "batch": args.batch, "seq": args.seq}))


def decode(args):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=g)
    n = args.new_tokens
    rates = []
    with torch.inference_mode():
        for i in range(2):
            t0 = time.perf_counter()
            model.generate(prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True, pad_token_id=0)
            rates.append(n / (time.perf_counter() - t0))
    print("RESULT " + json.dumps({"tool": "transformers", "mode": "decode", "new_tokens_per_s": round(rates[-1], 2)}))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "make":
        return make(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["lora", "decode"])
    p.add_argument("dir")
    p.add_argument("--autocast", choices=["bf16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    a = p.parse_args()
    (lora if a.mode == "lora" else decode)(a)


if __name__ == "__main__":
    main()
