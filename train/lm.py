"""Train a toy language model: the playground's main job.

    python -m train.lm configs/lm/<name>.yaml [key.sub=value ...] [--resume [--allow-changes] | --overwrite]
    torchrun --nproc_per_node 2 -m train.lm configs/lm/<name>.yaml      # DDP over gloo on CPU

Built on accelerate, so the same script runs on CPU, on a GPU, and under
torchrun. Writes runs/<run_name>/: config.yaml, metrics.jsonl, checkpoints/,
loss.png and, for MoE models, expert_load.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from omegaconf import OmegaConf
from tqdm import tqdm

from moe_playground.models.memory.ema_slot import EMASlotConfig, EMASlotMemory
from moe_playground.models.memory.product_key import ProductKeyConfig, ProductKeyMemory
from moe_playground.models.moe import MoE, MoEConfig
from moe_playground.models.transformer import Transformer, TransformerConfig
from moe_playground.models.upcycle import Upcycling
from moe_playground.models.validate import check
from moe_playground.train import plots
from moe_playground.train.checkpoint import (DONE_MARKER, CheckpointError, RunDirError, atomic_write_text, check_run_dir, check_run_name,
                              latest_checkpoint, load_newest_good_checkpoint, prepare_run_dir, run_dir_lock,
                              save_checkpoint)
from moe_playground.train.config import ConfigError, load_config, to_yaml
from moe_playground.train import warmstart
from moe_playground.train.data import Corpus, DataConfig, Tokenizer, build_corpus, build_tokenizer, sample_windows
from moe_playground.train.evaluation import evaluate
from moe_playground.train.sampling import domain_samples

# ---- config -------------------------------------------------------------------------------


def check_optimizer(t) -> None:
    """The checks of the AdamW + warmup-cosine fields every trainer's `train` section has (lm, framepack)."""
    check(t.lr > 0, f"train.lr={t.lr} must be > 0")
    check(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    check(0 <= t.warmup_steps <= t.steps, f"train.warmup_steps={t.warmup_steps} must be in [0, steps={t.steps}]")
    check(t.weight_decay >= 0 and t.grad_clip >= 0, "train.weight_decay and train.grad_clip must be >= 0")
    check(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
    check(t.stop_at is None or 1 <= t.stop_at <= t.steps, f"train.stop_at={t.stop_at} must be in [1, steps={t.steps}]")


@dataclass
class OptimConfig:
    steps: int = 600                # length of the schedule
    stop_at: int | None = None      # stop early at this step with a checkpoint, as if pre-empted
    batch_size: int = 16            # sequences per micro-batch per process
    grad_accum: int = 1             # micro-batches per optimizer step
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0          # 0 = off
    precision: str = "fp32"         # "fp32" | "bf16" (autocast)
    seed: int = 0
    threads: int | None = None      # torch threads per process; default: cores / processes

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            check(getattr(self, name) >= 1, f"train.{name}={getattr(self, name)} must be >= 1")
        check_optimizer(self)
        check(self.precision in ("fp32", "bf16"), f"train.precision={self.precision!r} must be 'fp32' or 'bf16'")
        check(self.threads is None or self.threads >= 1, f"train.threads={self.threads} must be >= 1")


@dataclass
class LogConfig:
    log_every: int = 10
    eval_every: int = 100
    ckpt_every: int = 200
    keep_checkpoints: int = 3       # the newest kept; resume falls back to an older one when the newest does not load
    progress: bool = True
    tensorboard: bool = False       # also every metrics row to TensorBoard, in <run dir>/tensorboard (accelerate's tracker)

    def __post_init__(self) -> None:
        for name in ("log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
            check(getattr(self, name) >= 1, f"log.{name}={getattr(self, name)} must be >= 1")
        check(not self.tensorboard or importlib.util.find_spec("tensorboard") is not None,
              "log.tensorboard=true needs the tensorboard package (pip install tensorboard)")


# model.ffn -> the sparse layer it builds, from the run config's section of the same name
SPARSE_FFN = {"moe": MoE, "pkm": ProductKeyMemory, "ema_slot": EMASlotMemory}


@dataclass
class LMRunConfig:
    run_name: str = "lm"
    out_dir: str = "runs"
    model: TransformerConfig = field(default_factory=TransformerConfig)
    # used by the layers model.ffn=moe makes sparse; its d_model is the model's, set by build_model
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(d_model=None))
    # the same for model.ffn=pkm (product-key memory) and model.ffn=ema_slot (EMA slot memory)
    pkm: ProductKeyConfig = field(default_factory=lambda: ProductKeyConfig(d_model=None))
    ema_slot: EMASlotConfig = field(default_factory=lambda: EMASlotConfig(d_model=None))
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # start from trained weights: a local transformers Llama-family folder (with data.tokenizer=pretrained) or a
    # finished run directory; "{seed}" stands for train.seed, "{out_dir}" for out_dir. The source sets model.* (train/warmstart.py)
    init_from: str | None = None
    # with a dense init_from and model.ffn=moe, how its FFNs become experts: copy, drop:<r> or granular:<G>
    upcycle: str | None = None

    def __post_init__(self) -> None:
        check_run_name(self.run_name)
        check(self.upcycle is None or self.init_from is not None, f"upcycle={self.upcycle!r} needs init_from")
        if self.upcycle is not None:
            Upcycling.parse(self.upcycle)
        check((self.data.tokenizer == "pretrained") <= (self.init_from is not None),
              "data.tokenizer=pretrained needs init_from (a transformers folder with a tokenizer)")
        if self.init_from is not None:
            return  # the model comes from the source: checked against it by warmstart.resolve
        check(self.train.seq_len <= self.model.max_seq_len,
              f"train.seq_len={self.train.seq_len} must be <= model.max_seq_len={self.model.max_seq_len}")
        if self.data.tokenizer == "byte":
            check(self.model.vocab_size == 256, f"model.vocab_size={self.model.vocab_size} must be 256 with data.tokenizer=byte")
        else:
            check(self.model.vocab_size == self.data.bpe_vocab_size,
                  f"model.vocab_size={self.model.vocab_size} must equal data.bpe_vocab_size={self.data.bpe_vocab_size}")
        for key in SPARSE_FFN:
            width = getattr(self, key).d_model
            check(width in (None, self.model.d_model),
                  f"{key}.d_model={width} must be left unset: the {key} layers take model.d_model={self.model.d_model}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name


# Settings a resumed run may give differently: these change nothing a run computes ...
RESUME_FREE = ("out_dir", "train.stop_at", "train.threads", "log.progress", "log.tensorboard")
# ... and these change only its length and bookkeeping: allowed with --allow-changes, recorded in CHANGES_FILE
RESUME_SAFE = ("train.steps", "log.log_every", "log.eval_every", "log.ckpt_every", "log.keep_checkpoints")
CHANGES_FILE = "config_changes.jsonl"


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(old: LMRunConfig, new: LMRunConfig) -> dict[str, tuple[Any, Any]]:
    """{key.sub: (old value, new value)} for every setting that differs, except those in RESUME_FREE."""
    a, b = (_flat(OmegaConf.to_container(OmegaConf.structured(c))) for c in (old, new))
    return {k: (a[k], b[k]) for k in a if a[k] != b[k] and k not in RESUME_FREE}


def resume_changes(cfg, allow_changes: bool) -> dict[str, tuple[Any, Any]]:
    """The changes resuming `cfg.run_dir` with `cfg` (any trainer's run config) makes to the run's saved config;
    RunDirError listing the keys when one is not allowed (with `allow_changes`, those in RESUME_SAFE are)."""
    try:
        saved = load_config(type(cfg), cfg.run_dir / "config.yaml")
    except ConfigError as e:
        raise RunDirError(f"cannot resume {cfg.run_dir}: its config does not load ({e})") from None
    changes = config_changes(saved, cfg)
    refused = [k for k in changes if not (allow_changes and k in RESUME_SAFE)]
    if refused:
        raise RunDirError(
            f"cannot resume {cfg.run_dir} with a different config, it would mix two in one run: "
            + ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
            + ". Resume with the run's own settings, start again with --overwrite, or choose another run_name"
            + f" (with --allow-changes a resume may change {', '.join(RESUME_SAFE)})")
    return changes


def record_changes(run_dir: Path, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append the settings a resume at `step` changed to the run's CHANGES_FILE."""
    with (run_dir / CHANGES_FILE).open("a") as f:
        f.write(json.dumps({"step": step, "changes": {k: list(v) for k, v in changes.items()}}) + "\n")


# ---- pieces ------------------------------------------------------------------------------


def build_model(cfg: LMRunConfig) -> Transformer:
    if cfg.model.ffn == "dense":
        return Transformer(cfg.model)
    layer, layer_cfg = SPARSE_FFN[cfg.model.ffn], getattr(cfg, cfg.model.ffn)
    return Transformer(cfg.model, ffn_factory=lambda i: layer(replace(layer_cfg, d_model=cfg.model.d_model)))


TOKENIZER_FILE = "tokenizer.json"  # in the run directory of a BPE run


def tokenizer_source(cfg: LMRunConfig, run_dir: Path, trained: bool) -> Path | None:
    """Where the tokenizer of a run in `run_dir` is read from (`trained`: the run has saved its BPE tokenizer);
    None: made afresh (bytes, or BPE trained on the corpus)."""
    if cfg.data.tokenizer == "pretrained":
        return warmstart.source_path(cfg)
    if cfg.data.tokenizer == "bpe" and (trained or cfg.init_from is not None):
        return (run_dir if trained else warmstart.source_path(cfg)) / TOKENIZER_FILE
    return None


def run_tokenizer(cfg: LMRunConfig, run_dir: Path) -> Tokenizer:
    """The tokenizer a run in `run_dir` was trained with."""
    return build_tokenizer(cfg.data, tokenizer_source(cfg, run_dir, trained=True))


def lr_at(step: int, c: OptimConfig) -> float:
    """Multiplier of the base lr: linear warmup, then cosine down to min_lr_ratio."""
    if step < c.warmup_steps:
        return (step + 1) / c.warmup_steps
    progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
    return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: torch.nn.Module, c: OptimConfig) -> torch.optim.AdamW:
    # no weight decay on norms and biases (1-D tensors); the router and experts are matrices and decay
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), fused=False)


class NonFiniteLoss(RuntimeError):
    pass


class ModelTooLarge(ValueError):
    """The model's parameters and optimizer state would not fit in the free memory."""


BYTES_PER_PARAM = 16  # fp32 weights, their gradients and AdamW's two moments


def _size(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def memory_check(cfg: LMRunConfig, device: torch.device) -> str:
    """A line estimating parameter and optimizer memory against the free memory of `device`; raises
    ModelTooLarge, naming the sizes, when it does not fit. Builds the model on the meta device: nothing
    is allocated. Activations are not counted."""
    try:
        with torch.device("meta"):
            n = build_model(cfg).num_parameters()
    except RuntimeError as e:  # a single weight too large to even count its bytes
        raise ModelTooLarge(f"model: too large to build ({e}); make it smaller (model.d_model, model.n_layer, "
                            "model.ffn_hidden, moe.n_routed_experts)") from None
    if device.type == "cuda":
        free, where, procs = torch.cuda.mem_get_info(device)[0], f"GPU {device}", 1
    else:  # the processes of a CPU run share this machine's memory
        free, where, procs = psutil.virtual_memory().available, "this machine", int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need = n * BYTES_PER_PARAM * procs
    sizes = (f"{n:,} parameters need about {_size(need)} for weights, gradients and AdamW state "
             f"({BYTES_PER_PARAM} bytes each{f' in each of {procs} processes' if procs > 1 else ''}, activations not counted)")
    if need > free:
        raise ModelTooLarge(f"model: {sizes}, more than the {_size(free)} free on {where}; make it smaller "
                            "(model.d_model, model.n_layer, model.ffn_hidden, moe.n_routed_experts)")
    return f"memory: {sizes}; {_size(free)} free on {where}"


# ---- training ------------------------------------------------------------------------------
#
# `train` checks everything and prepares the run directory; `_run` then reads top to bottom:
# set_up (model, optimizer, state restored on resume) -> per step: train_step, evaluate when due,
# log_row into the one MetricsLog, save when due -> finish (summary, plots, DONE).


TRAIN_STATE = ("optimizer", "scheduler", "torch_rng", "data_rng", "step", "expert_load")  # what a checkpoint must hold


def loop_state(opt, sched, data_gen: torch.Generator) -> dict[str, Any]:
    """The optimizer, schedule and random states a checkpoint keeps for an exact resume (every trainer)."""
    return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
            "data_rng": data_gen.get_state()}


def restore_loop_state(opt, sched, data_gen: torch.Generator, state: dict[str, Any]) -> None:
    """Undo `loop_state`: the optimizer, schedule and random states of a checkpoint."""
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    data_gen.set_state(state["data_rng"])


def train(cfg: LMRunConfig, *, resume: bool = False, overwrite: bool = False, allow_changes: bool = False) -> dict[str, Any]:
    """Train per `cfg`; returns a summary (final val loss, tokens/s, run dir, ...).

    `resume` continues the run from its newest checkpoint that loads, refusing a changed config
    (`allow_changes`: the changes in RESUME_SAFE pass and are recorded); `overwrite` starts it again.
    The run directory is locked for the whole run: a second process on it gets RunDirBusy."""
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if cfg.train.precision == "bf16" else "no",
                      kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
                      log_with="tensorboard" if cfg.log.tensorboard else None, project_dir=cfg.run_dir)
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // acc.num_processes))
    run_dir = cfg.run_dir
    # everything that can fail on bad input happens before the run directory is touched
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    cfg = warmstart.resolve(cfg)
    changes, resumed, start = {}, None, None
    if resume:
        changes = resume_changes(cfg, allow_changes)
        resumed = load_newest_good_checkpoint(run_dir, TRAIN_STATE)
    memory = memory_check(cfg, acc.device)
    tokenizer_file = tokenizer_source(cfg, run_dir, trained=resume)
    if tokenizer_file is not None and not tokenizer_file.exists():
        raise CheckpointError(f"{tokenizer_file} is missing: the run needs the tokenizer its weights were trained with")
    corpus = build_corpus(cfg.data, tokenizer_file)
    check(corpus.tokenizer.vocab_size <= cfg.model.vocab_size and cfg.train.seq_len <= cfg.model.max_seq_len,
          f"the model (vocab_size={cfg.model.vocab_size}, max_seq_len={cfg.model.max_seq_len}) must take the "
          f"tokenizer's {corpus.tokenizer.vocab_size} tokens and train.seq_len={cfg.train.seq_len}")
    if cfg.init_from is not None and not resume:
        start = warmstart.initial_weights(cfg)
    for split, stream in (("training", corpus.train), ("validation", corpus.val)):
        if len(stream.tokens) < cfg.train.seq_len + 2:
            raise ValueError(f"data: the {split} split has {len(stream.tokens)} tokens, fewer than train.seq_len + 2 = "
                             f"{cfg.train.seq_len + 2}; add text, raise data.val_fraction or lower train.seq_len")
    acc.wait_for_everyone()  # every rank has checked the run directory before the main process locks it
    with run_dir_lock(run_dir) if acc.is_main_process else nullcontext():
        if acc.is_main_process:
            prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
            atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
            if cfg.data.tokenizer == "bpe" and not resume:  # a run keeps its own copy
                corpus.tokenizer.save(run_dir / TOKENIZER_FILE)
            print(memory, flush=True)
        if cfg.log.tensorboard:
            acc.init_trackers(TENSORBOARD_DIR)
        acc.wait_for_everyone()
        return _run(cfg, acc, corpus, resumed or start, changes)


def _run(cfg: LMRunConfig, acc: Accelerator, corpus: Corpus, resumed: tuple | dict | None, changes: dict) -> dict[str, Any]:
    """The training loop of `train`, once every check has passed and the run directory is ready."""
    log = MetricsLog(cfg.run_dir / "metrics.jsonl", acc)
    s = set_up(cfg, acc, resumed, changes, log)
    last_step = cfg.train.stop_at or cfg.train.steps
    bar = tqdm(total=last_step, initial=s.step, disable=not (cfg.log.progress and acc.is_main_process),
               desc=cfg.run_name, unit="step")
    while s.step < last_step:
        train_loss, aux_means = train_step(s, corpus, cfg, acc)
        bar.update(1)
        evaluated = evaluate(s.model, corpus, cfg, acc) if s.step % cfg.log.eval_every == 0 or s.step == cfg.train.steps else {}
        if s.step % cfg.log.log_every == 0 or s.step == last_step or evaluated:
            row = log_row(s, evaluated, aux_means)
            log.append(row)
            if acc.is_main_process:
                bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in row.items() if "/" not in k))
        if s.step % cfg.log.ckpt_every == 0 or s.step == last_step:
            save(s, cfg, acc)
    bar.close()
    return finish(s, cfg, acc, log, corpus)


TENSORBOARD_DIR = "tensorboard"  # in the run directory, with log.tensorboard=true


class MetricsLog:
    """metrics.jsonl, the run's one log of rows: every write to it goes through here (main process only),
    and from here to accelerate's trackers (TensorBoard with log.tensorboard=true)."""

    def __init__(self, path: Path, acc: Accelerator):
        self.path, self.writer, self.acc = path, acc.is_main_process, acc

    def rows(self) -> list[dict]:
        return plots.read_metrics(self.path)

    def truncate(self, step: int) -> None:
        """Forget rows logged after `step` (a resumed run is about to redo them)."""
        if self.writer:
            atomic_write_text(self.path, "".join(json.dumps(m) + "\n" for m in self.rows() if m["step"] <= step))

    def append(self, row: dict) -> None:
        if self.writer:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self.acc.trackers:
            self.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


@dataclass
class RunState:
    """What the loop carries from step to step; `save` puts what a resume needs into a checkpoint."""
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    data_gen: torch.Generator      # same draws on every rank; each takes its slice
    tokens_per_step: int
    step: int = 0
    wall_before: float = 0.0       # wall time of earlier sessions of this run
    win_loss: float = 0.0          # train loss summed over the steps since the last row, and their count
    win_steps: int = 0
    # the model's per-expert metrics (`layer{i}/tokens_per_expert`) summed since the run began, for the load heatmap
    expert_load: dict[str, torch.Tensor] = field(default_factory=dict)
    t_start: float = 0.0           # when this session's loop began (perf_counter)
    t_window: float = 0.0          # when the current logging window began
    tok_window: int = 0

    def wall_s(self) -> float:
        """Wall time of the training loop over the steps this run kept, every session of it."""
        return self.wall_before + time.perf_counter() - self.t_start


def set_up(cfg: LMRunConfig, acc: Accelerator, resumed: tuple | dict | None, changes: dict, log: MetricsLog) -> RunState:
    """Model, optimizer and schedule, with the state of `resumed` restored (a checkpoint: path, weights, state,
    skipped), or starting from the weights `resumed` (init_from); prepared by accelerate."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_at(i, cfg.train))
    c = cfg.train
    s = RunState(model, opt, sched, torch.Generator().manual_seed(c.seed),
                 tokens_per_step=c.batch_size * c.grad_accum * acc.num_processes * c.seq_len)
    if isinstance(resumed, dict):
        warmstart.load_into(model, resumed)
    elif resumed:
        path, weights, state, skipped = resumed
        model.load_state_dict(weights)
        restore_loop_state(opt, sched, s.data_gen, state)
        s.step = int(state["step"])
        s.expert_load.update(state["expert_load"])
        # checkpoints written before wall time and the loss window were kept lack them
        s.wall_before, (s.win_loss, s.win_steps) = state.get("wall_s", 0.0), state.get("loss_window", (0.0, 0))
        log.truncate(s.step)
        if acc.is_main_process:
            (cfg.run_dir / DONE_MARKER).unlink(missing_ok=True)
            if changes:
                record_changes(cfg.run_dir, s.step, changes)
            print(f"resuming from {path} (step {s.step})" + "".join(f"; skipped {p}" for p in skipped)
                  + "".join(f"; {k} {a!r} -> {b!r}" for k, (a, b) in changes.items()), flush=True)
    s.model, s.opt = acc.prepare(model, opt)
    s.t_start = s.t_window = time.perf_counter()
    return s


def train_step(s: RunState, corpus: Corpus, cfg: LMRunConfig, acc: Accelerator) -> tuple[float, dict[str, float]]:
    """One optimizer step on a fresh global batch; returns its train loss and the model's scalar aux values
    (means over micro-batches and ranks). Raises NonFiniteLoss, naming the last good checkpoint."""
    c, world = cfg.train, acc.num_processes
    # one flat draw for the global batch, so 1 process x 2b and 2 processes x b see the same windows
    n_windows = len(corpus.train.tokens) - c.seq_len - 1
    starts = torch.randint(n_windows, (c.grad_accum * world * c.batch_size,), generator=s.data_gen)
    starts = starts.view(c.grad_accum, world, c.batch_size)[:, acc.process_index]
    loss_sum, aux_sum = torch.zeros(()), {}  # aux: the model's scalar aux losses and metrics, summed
    for micro in range(c.grad_accum):
        x, y, _ = sample_windows(corpus.train, starts[micro], c.seq_len)
        sync = micro == c.grad_accum - 1
        with acc.no_sync(s.model) if not sync else nullcontext(), acc.autocast():
            out = s.model(x.to(acc.device), y.to(acc.device))
            objective = out.loss + sum(out.aux_losses.values(), torch.zeros((), device=out.loss.device))
            acc.backward(objective / c.grad_accum)
        loss_sum += out.loss.detach().float().cpu()
        for k, v in {**out.aux_losses, **out.aux_metrics}.items():
            if v.numel() == 1:
                aux_sum[k] = aux_sum.get(k, 0) + v.detach().float()
            else:  # per-expert vectors go to the heatmap, not the log line
                s.expert_load[k] = s.expert_load.get(k, 0) + v.float().cpu()
    # mean over micro-batches and ranks: the logged values are the global batch's, and every rank sees a NaN
    means = acc.reduce(torch.stack([loss_sum.to(acc.device), *aux_sum.values()]) / c.grad_accum, reduction="mean").tolist()
    train_loss, aux_means = means[0], dict(zip(aux_sum, means[1:]))
    if not math.isfinite(train_loss):
        good = latest_checkpoint(cfg.run_dir)
        raise NonFiniteLoss(f"loss became {train_loss} at step {s.step + 1}; stopped. "
                            f"Last good checkpoint: {good if good else 'none yet'}")
    if c.grad_clip > 0:
        acc.clip_grad_norm_(s.model.parameters(), c.grad_clip)
    s.opt.step()
    s.sched.step()
    s.opt.zero_grad(set_to_none=True)
    acc.unwrap_model(s.model).after_optimizer_step()
    s.step += 1
    s.tok_window += s.tokens_per_step
    s.win_loss, s.win_steps = s.win_loss + train_loss, s.win_steps + 1
    return train_loss, aux_means


def log_row(s: RunState, evaluated: dict[str, float], aux_means: dict[str, float]) -> dict[str, Any]:
    """The metrics row of this step (train_loss: the mean over the steps since the last row; `evaluated`: what
    `evaluate` returned, when it ran this step); starts a new window."""
    now = time.perf_counter()
    row = {"step": s.step, "tokens": s.step * s.tokens_per_step, "train_loss": round(s.win_loss / s.win_steps, 5),
           "lr": s.sched.get_last_lr()[0], "tokens_per_s": round(s.tok_window / (now - s.t_window), 1)}
    row.update(evaluated)
    row.update({k: round(v, 6) for k, v in aux_means.items()})
    s.t_window, s.tok_window, s.win_loss, s.win_steps = now, 0, 0.0, 0
    return row


def save(s: RunState, cfg: LMRunConfig, acc: Accelerator) -> None:
    """A checkpoint of the weights and everything a resume needs to continue exactly."""
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {**loop_state(s.opt, s.sched, s.data_gen), "step": s.step, "wall_s": s.wall_s(),
                 "loss_window": (s.win_loss, s.win_steps), "expert_load": s.expert_load}
        save_checkpoint(cfg.run_dir, s.step, acc.unwrap_model(s.model).state_dict(), state, keep=cfg.log.keep_checkpoints)


def finish(s: RunState, cfg: LMRunConfig, acc: Accelerator, log: MetricsLog, corpus: Corpus) -> dict[str, Any]:
    """The run's summary (also summary.json) with a greedy sample per corpus domain, its plots, and the DONE
    marker once every step ran."""
    wall, run_dir = s.wall_s(), cfg.run_dir
    summary = {"run_dir": str(run_dir), "step": s.step, "finished": s.step == cfg.train.steps}
    base = acc.unwrap_model(s.model)
    summary.update(params=base.num_parameters(), active_params=base.active_parameters(),
                   flops_per_token=base.flops_per_token(cfg.train.seq_len))
    if acc.is_main_process:
        metrics = log.rows()
        vals = [m["val_loss"] for m in metrics if "val_loss" in m]
        speeds = [m["tokens_per_s"] for m in metrics[1:]] or [m["tokens_per_s"] for m in metrics]
        # tokens_per_s: the whole run's throughput; the median logging window (first left out) is steadier but flatters
        summary.update(final_val_loss=vals[-1] if vals else None, tokens=s.step * s.tokens_per_step, wall_s=round(wall, 6),
                       tokens_per_s=round(s.step * s.tokens_per_step / wall, 1),
                       tokens_per_s_median_window=statistics.median(speeds), samples=domain_samples(base, corpus))
        plots.loss_curve(metrics, run_dir / "loss.png", cfg.run_name)
        if s.expert_load:
            rows = [(load / load.sum()).tolist() for load in s.expert_load.values()]
            plots.heatmap(rows, [k.split("/")[0] for k in s.expert_load], "expert", run_dir / "expert_load.png",
                          "share of routed tokens per expert", "share")
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        if summary["finished"]:
            atomic_write_text(run_dir / DONE_MARKER, "")
    acc.wait_for_everyone()
    acc.end_training()
    return summary


# ---- command line ----------------------------------------------------------------------------


def trainer_cli(prog: str, doc: str | None, schema: type, train_fn, argv: list[str] | None, example: str) -> dict | None:
    """The command line every trainer shares: `<config> [overrides] [--resume | --overwrite]
    [--allow-changes]`, config loaded onto `schema`, then `train_fn(cfg, resume=, overwrite=,
    allow_changes=)`. Returns its summary, or None after printing `error: ...` for bad input."""
    p = argparse.ArgumentParser(prog=prog, description=doc, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help=f"YAML config, e.g. {example}")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue runs/<run_name> from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="delete an existing runs/<run_name> and start again")
    p.add_argument("--allow-changes", action="store_true",
                   help=f"with --resume: allow a changed {', '.join(RESUME_SAFE)}; recorded in <run dir>/{CHANGES_FILE}")
    args = p.parse_intermixed_args(argv)
    if args.allow_changes and not args.resume:
        p.error("--allow-changes applies only with --resume")
    try:
        cfg = load_config(schema, args.config, args.overrides)
        return train_fn(cfg, resume=args.resume, overwrite=args.overwrite, allow_changes=args.allow_changes)
    except (ConfigError, RunDirError, NonFiniteLoss, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    summary = trainer_cli("python -m train.lm", __doc__, LMRunConfig, train, argv, "configs/lm/deepseekmoe.yaml")
    if summary is None:
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
        for domain, sample in summary.get("samples", {}).items():
            print(f"sample ({domain}): {sample['prompt']!r} -> {sample['continuation']!r}")
        print(f"final val loss {summary['final_val_loss']} | {summary['tokens_per_s']:.0f} tokens/s | "
              f"{summary['params'] / 1e6:.2f}M params ({summary['active_params'] / 1e6:.2f}M active) | run dir {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
