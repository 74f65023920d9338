"""Run directories and crash-safe checkpoints.

A run directory `runs/<name>/` holds `config.yaml`, `metrics.jsonl`, plots and
`checkpoints/`. Each checkpoint is a folder `step_<N>/` with the model weights
as safetensors and the training state (optimizer, scheduler, RNG, step) as a
tensors-only torch file loaded with `weights_only=True`. A checkpoint becomes
current only when the file `checkpoints/latest` is atomically replaced to name
it, so a run killed mid-save still resumes from its previous good checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

DONE_MARKER = "DONE"  # written last by a run that finished


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (and nothing was written)."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Raise RunDirError unless `run_dir` may be used as asked; touches nothing.

    A new or empty folder is fine. An existing run needs `resume` (continue it)
    or `overwrite` (start again, deleting it); otherwise we refuse, naming both.
    """
    if resume and overwrite:
        raise RunDirError("resume and overwrite exclude each other: pick one")
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise RunDirError(f"cannot resume {run_dir}: it has no checkpoint")
    elif run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        state = "a finished run" if (run_dir / DONE_MARKER).exists() else "an unfinished run"
        raise RunDirError(
            f"{run_dir} already holds {state}; continue it with --resume, delete it and start "
            "again with --overwrite, or choose another run_name"
        )


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """`check_run_dir`, then create the folder; only `overwrite` deletes an existing run."""
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


def save_checkpoint(run_dir: Path, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any], keep: int = 1) -> Path:
    """Write `step_<step>/`, point `latest` at it, then prune older ones (keeping `keep`)."""
    root = run_dir / "checkpoints"
    path = root / f"step_{step:08d}"
    if path.exists():  # left by a save that crashed before `latest` moved
        shutil.rmtree(path)
    path.mkdir(parents=True)
    # safetensors refuses tensors that share storage (tied embeddings): save each once
    weights = {k: v.detach().contiguous().clone() for k, v in model_state.items()}
    atomic_write(path / "model.safetensors", lambda tmp: save_file(weights, str(tmp)))
    atomic_write(path / "state.pt", lambda tmp: torch.save(train_state, tmp))
    atomic_write_text(root / "latest", path.name)
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep)]:
        if old != path:
            shutil.rmtree(old)
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and training state of one checkpoint folder; never unpickles code."""
    return load_file(str(path / "model.safetensors")), torch.load(path / "state.pt", weights_only=True)
