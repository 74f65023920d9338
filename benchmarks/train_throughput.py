"""What does the trainer cost over a bare PyTorch loop?

    python -m benchmarks.train_throughput [--config configs/lm/deepseekmoe.yaml] [--steps 40] [--repeats 3]

Trains the same model on the same batches, alternating between the trainer
(train.lm.train: accelerate, logging, checkpoint at the end, aux losses, bias
updates) and a bare loop (forward, backward, clip, AdamW step), and prints
tokens/s of each, repeated, then the ratio bare/trainer as the last line.
Steady state only: the first log window of each trainer run and the first
steps of each bare run are warm-up and not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from moe_playground.train.config import load_config
from moe_playground.train.data import build_corpus, sample_windows
from moe_playground.train.lm import LMRunConfig, build_model, build_optimizer, lr_at, train


def trainer_tokens_per_s(cfg: LMRunConfig) -> float:
    with tempfile.TemporaryDirectory() as out:
        summary = train(replace(cfg, out_dir=out))
    return summary["tokens_per_s_median_window"]  # steady state, like the bare loop after its warmup


def bare_tokens_per_s(cfg: LMRunConfig, warmup: int) -> float:
    c = cfg.train
    torch.manual_seed(c.seed)
    corpus = build_corpus(cfg.data)
    model = build_model(cfg)
    opt = build_optimizer(model, c)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, c))
    gen = torch.Generator().manual_seed(c.seed)
    n_windows = len(corpus.train.tokens) - c.seq_len - 1
    for step in range(c.steps):
        if step == warmup:
            start = time.perf_counter()
        x, y, _ = sample_windows(corpus.train, torch.randint(n_windows, (c.batch_size,), generator=gen), c.seq_len)
        out = model(x, y)
        (out.loss + sum(out.aux_losses.values(), torch.zeros(()))).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        model.after_optimizer_step()
    return (c.steps - warmup) * c.batch_size * c.seq_len / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/lm/deepseekmoe.yaml")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    log_every = args.steps // 4
    cfg = load_config(LMRunConfig, args.config, [
        f"train.steps={args.steps}", f"train.warmup_steps={min(10, args.steps)}", f"log.log_every={log_every}",
        f"log.eval_every={10 * args.steps}", f"log.ckpt_every={10 * args.steps}", "log.progress=false"])
    rows = []
    for r in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        t = trainer_tokens_per_s(cfg)
        b = bare_tokens_per_s(cfg, warmup=log_every)
        rows.append((t, b))
        print(f"repeat {r}: trainer {t:9.0f} tok/s | bare loop {b:9.0f} tok/s | bare/trainer {b / t:.3f}", flush=True)
    t_med, b_med = statistics.median(t for t, _ in rows), statistics.median(b for _, b in rows)
    print(f"median:   trainer {t_med:9.0f} tok/s | bare loop {b_med:9.0f} tok/s")
    print(json.dumps({"config": args.config, "trainer_tokens_per_s": round(t_med), "bare_tokens_per_s": round(b_med),
                      "trainer_overhead": round(b_med / t_med - 1, 4), "target_overhead": 0.05}))


if __name__ == "__main__":
    main()
