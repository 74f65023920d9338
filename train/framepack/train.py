"""Train a FramePack next-section predictor on bouncing-shape videos.

    python -m train.framepack.train configs/framepack/<name>.yaml [key.sub=value ...] [--resume [--allow-changes] | --overwrite]

Every step draws fresh clips from the simulator and, per micro-batch, one kind of context
(a step of one of `train.modes`, see sampling.draw_known); the loss is the mean squared
error of the predicted section. Writes runs/<run_name>/: config.yaml, metrics.jsonl
(train loss, validation loss per mode), checkpoints/, loss.png, summary.json,
rollouts.png (a few rollouts per order against the truth) and DONE once finished.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moe_playground.models.framepack import FramePack, FramePackConfig
from moe_playground.models.validate import check
from moe_playground.train import plots
from moe_playground.train.checkpoint import (DONE_MARKER, RunDirError, atomic_write_text, check_run_dir, check_run_name,
                              load_newest_good_checkpoint, prepare_run_dir, run_dir_lock, save_checkpoint)
from moe_playground.train.config import load_config, to_yaml
from moe_playground.train.framepack.data import SimConfig, simulate, videos_for_seeds
from moe_playground.train.framepack.evaluate import save_strip
from moe_playground.train.framepack.sampling import ORDERS, draw_known, gather_context, rollout, section_starts
from moe_playground.train.lm import (LogConfig, NonFiniteLoss, build_optimizer, check_optimizer, loop_state, lr_at, record_changes,
                                    restore_loop_state, resume_changes, trainer_cli)

VAL_SEED = 1_000_003  # validation clips and contexts are the same for every run
STRIP_SEEDS = [10_000, 10_001]  # the videos of rollouts.png


@dataclass
class TrainConfig:
    steps: int = 1500
    stop_at: int | None = None      # stop early at this step with a checkpoint, as if pre-empted
    batch_size: int = 16            # clips per micro-batch
    grad_accum: int = 2             # micro-batches per step, each with its own kind of context
    clip_len: int = 32              # frames per training clip
    prompt: int = 2                 # given frames at the start of a video (the first is the anchor)
    modes: list[str] = field(default_factory=lambda: list(ORDERS))  # the orders whose contexts training draws
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0          # 0 = off
    eval_batches: int = 4           # validation micro-batches per order at each evaluation (fixed clips)
    seed: int = 0
    threads: int = 1                # torch threads

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "prompt", "eval_batches", "threads"):
            check(getattr(self, name) >= 1, f"train.{name}={getattr(self, name)} must be >= 1")
        check_optimizer(self)
        check(len(self.modes) >= 1 and all(m in ORDERS for m in self.modes),
              f"train.modes={self.modes} must be a non-empty list drawn from {ORDERS}")


@dataclass
class FramePackRunConfig:
    run_name: str = "framepack"
    out_dir: str = "runs"
    model: FramePackConfig = field(default_factory=FramePackConfig)
    data: SimConfig = field(default_factory=SimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        check_run_name(self.run_name)
        self.data.check_frame(self.model.frame_size)
        try:
            section_starts(self.train.clip_len, self.train.prompt, self.model.section)
        except ValueError as e:
            raise ValueError(f"train.clip_len={self.train.clip_len}: {e}") from None

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name


TRAIN_STATE = ("optimizer", "scheduler", "torch_rng", "data_rng", "step")


def batch_loss(model: FramePack, cfg: FramePackRunConfig, gen: torch.Generator, modes: list[str]) -> torch.Tensor:
    """The model's loss on one micro-batch: fresh clips and a context of one of `modes`, drawn from `gen`."""
    c = cfg.train
    clips = simulate(cfg.data, cfg.model.frame_size, c.clip_len, gen, c.batch_size).frames_BLHW
    start, known = draw_known(gen, c.clip_len, c.prompt, cfg.model.section, modes)
    return model.loss(gather_context(clips, known, start, model), clips[:, start:start + cfg.model.section], gen)


@torch.no_grad()
def evaluate(model: FramePack, cfg: FramePackRunConfig) -> dict[str, float]:
    """Validation loss per mode over fixed clips and contexts (`train.eval_batches` micro-batches per mode)."""
    model.eval()
    out = {}
    for mode in cfg.train.modes:
        gen = torch.Generator().manual_seed(VAL_SEED)
        losses = [batch_loss(model, cfg, gen, [mode]) for _ in range(cfg.train.eval_batches)]
        out[f"val_loss/{mode}"] = torch.stack(losses).mean().item()
    model.train()
    out["val_loss"] = sum(out.values()) / len(out)
    return out


def write_rollout_strips(model: FramePack, cfg: FramePackRunConfig, path: Path, length: int, modes: list[str]) -> None:
    """A PNG of the truth and each order's rollout of the STRIP_SEEDS videos."""
    truth = videos_for_seeds(cfg.data, cfg.model.frame_size, length, STRIP_SEEDS).frames_BLHW
    rows = {"truth": truth} | {m: rollout(model, truth[:, :cfg.train.prompt], length, m).video_BLHW for m in modes}
    save_strip(path, rows, f"{cfg.run_name}: rollouts of {length} frames ({cfg.train.prompt} given)")


def train(cfg: FramePackRunConfig, *, resume: bool = False, overwrite: bool = False, allow_changes: bool = False) -> dict[str, Any]:
    """Train per `cfg`; returns the summary. The run directory is locked for the whole run."""
    torch.set_num_threads(cfg.train.threads)
    run_dir = cfg.run_dir
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    resumed, changes = None, {}
    if resume:
        changes = resume_changes(cfg, allow_changes)
        resumed = load_newest_good_checkpoint(run_dir, TRAIN_STATE)
    with run_dir_lock(run_dir):
        prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        if changes:
            record_changes(run_dir, int(resumed[2]["step"]), changes)
        return _run(cfg, resumed)


def _run(cfg: FramePackRunConfig, resumed: tuple | None) -> dict[str, Any]:
    run_dir, c, log = cfg.run_dir, cfg.train, cfg.log
    torch.manual_seed(c.seed)
    model = FramePack(cfg.model)
    opt = build_optimizer(model, c)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, c))
    gen = torch.Generator().manual_seed(c.seed)
    step, wall_before = 0, 0.0
    metrics_file = run_dir / "metrics.jsonl"
    if resumed:
        path, weights, state, skipped = resumed
        model.load_state_dict(weights)
        restore_loop_state(opt, sched, gen, state)
        step, wall_before = int(state["step"]), float(state.get("wall_s", 0.0))
        kept = [m for m in plots.read_metrics(metrics_file) if m["step"] <= step]  # what follows is about to be redone
        atomic_write_text(metrics_file, "".join(json.dumps(m) + "\n" for m in kept))
        (run_dir / DONE_MARKER).unlink(missing_ok=True)
        print(f"resuming from {path} (step {step})" + "".join(f"; skipped {p}" for p in skipped), flush=True)

    last = c.stop_at or c.steps
    bar = tqdm(total=last, initial=step, disable=not log.progress, desc=cfg.run_name, unit="step")
    t_start = time.perf_counter()
    t_window, win = t_start, []
    wall = lambda: wall_before + time.perf_counter() - t_start  # noqa: E731
    while step < last:
        total = 0.0
        for _ in range(c.grad_accum):
            loss = batch_loss(model, cfg, gen, c.modes)
            (loss / c.grad_accum).backward()
            total += loss.item() / c.grad_accum
        if not math.isfinite(total):
            raise NonFiniteLoss(f"loss became {total} at step {step + 1}; stopped")
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        win.append(total)
        bar.update(1)
        evals = evaluate(model, cfg) if step % log.eval_every == 0 or step == c.steps else {}
        if step % log.log_every == 0 or step == last or evals:
            now = time.perf_counter()
            row = {"step": step, "train_loss": round(sum(win) / len(win), 6), "lr": sched.get_last_lr()[0],
                   "clips_per_s": round(len(win) * c.batch_size * c.grad_accum / (now - t_window), 2)}
            row |= {k: round(v, 6) for k, v in evals.items()}
            with metrics_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            bar.write(" | ".join(f"{k} {v:.4g}" for k, v in row.items()))
            t_window, win = now, []
        if step % log.ckpt_every == 0 or step == last:
            state = {**loop_state(opt, sched, gen), "step": step, "wall_s": wall()}
            save_checkpoint(run_dir, step, model.state_dict(), state, keep=log.keep_checkpoints)
    bar.close()
    metrics = plots.read_metrics(metrics_file)
    vals = [m for m in metrics if "val_loss" in m]
    summary = {"run_dir": str(run_dir), "step": step, "finished": step == c.steps, "params": model.num_parameters(),
               "wall_s": round(wall(), 3), "final_val_loss": vals[-1]["val_loss"] if vals else None}
    plots.loss_curve(metrics, run_dir / "loss.png", cfg.run_name, ylabel="mean squared error per pixel")
    if summary["finished"]:
        write_rollout_strips(model.eval(), cfg, run_dir / "rollouts.png", 4 * c.clip_len, c.modes)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    if summary["finished"]:
        atomic_write_text(run_dir / DONE_MARKER, "")
    return summary


def load_trained(run_dir: Path) -> tuple[FramePack, FramePackRunConfig]:
    """The model of a finished run and its config; RunDirError if the run has not finished."""
    if not (run_dir / DONE_MARKER).is_file():
        raise RunDirError(f"{run_dir} holds no finished run (no {DONE_MARKER} file); train it first")
    cfg = load_config(FramePackRunConfig, run_dir / "config.yaml")
    _, weights, _, _ = load_newest_good_checkpoint(run_dir)
    model = FramePack(cfg.model)
    model.load_state_dict(weights)
    return model.eval(), cfg


def main(argv: list[str] | None = None) -> int:
    summary = trainer_cli("python -m train.framepack.train", __doc__, FramePackRunConfig, train, argv, "configs/framepack/base.yaml")
    if summary is None:
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
