#!/usr/bin/env python3
"""TRL's SFTTrainer with its defaults on a task's train.jsonl, saving the LoRA adapter (PEFT
format) so that `afinar eval --adapter` scores it on the same test items as afinar's own run.

    $VENV/bin/python bench/recipes/trl_sft.py --data train.jsonl --out DIR [--epochs N] [--threads 2]

The job is `../shared/bench/peft_baseline.py sft` (same model load, LoRA r=16/alpha=32 on the seven
projections, batch 8, lr 2e-4, TRL's other defaults: bf16 autocast, gradient checkpointing,
linear decay, no packing, answer-only loss), run for whole epochs instead of a step count, and
with the adapter kept. Prints one `RESULT {json}` line last (wall time of the whole process).
"""
import argparse
import json
import os
import sys
import time

T0 = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.environ.get("AFINAR_SHARED_BENCH", os.path.join(HERE, "..", "..", "..", "shared", "bench"))
sys.path.insert(0, BENCH)
import peft_baseline as pb  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=float, default=3.0, help="TRL's default is 3")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=pb.DEFAULT_MODEL)
    args = p.parse_args()
    pb.set_thread_env(args.threads)
    torch = pb.import_torch(args.threads)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = pb.read_sft_jsonl(args.data)
    model, _ = pb.load_model(torch, args.model)
    tok = pb.load_tokenizer(args.model)
    cfg = SFTConfig(output_dir=args.out + ".trainer", per_device_train_batch_size=8, learning_rate=pb.LR,
                    num_train_epochs=args.epochs, eval_strategy="no", save_strategy="no",
                    report_to="none", use_cpu=True, logging_steps=10)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=pb.lora_config())
    t = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t
    trainer.model.save_pretrained(args.out)
    res = {"examples": len(rows), "epochs": args.epochs, "steps": out.global_step, "train_s": round(train_s, 1),
           "wall_s": round(time.perf_counter() - T0, 1), "train_loss_mean": out.training_loss,
           "peak_rss_mib": round(pb.peak_rss_mib()), "machine": pb.machine()}
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
