"""A run loaded back from its directory: config, model (newest checkpoint that loads) and tokenizer.

Shared by the commands that use a trained model: export, sample, and `init_from` (upcycling)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moe_playground.train.checkpoint import CheckpointError, load_newest_good_checkpoint
from moe_playground.train.config import ConfigError, load_config
from moe_playground.train.data import BPETokenizer, ByteTokenizer
from moe_playground.train.lm import LMRunConfig, build_model, run_tokenizer


@dataclass
class TrainedRun:
    run_dir: Path
    cfg: LMRunConfig
    model: torch.nn.Module         # in eval mode, fp32
    tokenizer: ByteTokenizer | BPETokenizer
    step: int


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "checkpoints").is_dir()


def load_run(run_dir: str | Path) -> TrainedRun:
    """The run's model at its newest checkpoint that loads; CheckpointError naming the problem otherwise."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise CheckpointError(f"{run_dir} is not a run directory of python -m train.lm (it needs config.yaml and "
                              "checkpoints/)")
    try:
        cfg = load_config(LMRunConfig, run_dir / "config.yaml")
    except ConfigError as e:
        raise CheckpointError(f"{run_dir}/config.yaml does not load: {e}") from None
    _, weights, state, _ = load_newest_good_checkpoint(run_dir, ("step",))
    model = build_model(cfg)
    model.load_state_dict(weights)
    return TrainedRun(run_dir, cfg, model.eval(), run_tokenizer(cfg, run_dir), int(state["step"]))
