"""Run directories and crash-safe checkpoints.

A run directory `runs/<name>/` holds `config.yaml`, `metrics.jsonl`, plots and
`checkpoints/`. Each checkpoint is a folder `step_<N>/` with the model weights
as safetensors and the training state (optimizer, scheduler, RNG, step) as a
tensors-only torch file loaded with `weights_only=True`. A checkpoint becomes
current only when the file `checkpoints/latest` is atomically replaced to name
it, so a run killed mid-save still resumes from its previous good checkpoint;
one that does not load is skipped for the newest older one that does.

The run-directory guard, shared by every pipeline that writes a run:

- a run name is a plain folder name (`check_run_name`);
- every run directory this project makes holds the file `RUN_MARKER`, and
  overwriting deletes only such a folder, never one without it;
- one process at a time: `run_dir_lock` holds an exclusive lock on
  `<run dir>/.lock` for as long as the run lasts; a second process stops at
  once with `RunDirBusy`, naming the process that holds it.

Typical use, for a pipeline that keeps the lock for the whole run:

    check_run_dir(run_dir, resume=resume, overwrite=overwrite)   # before any work; writes nothing
    ...validate everything else...
    with run_dir_lock(run_dir):                                  # RunDirBusy if another process has it
        prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
        ...the whole run...
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file

DONE_MARKER = "DONE"  # written last by a run that finished
RUN_MARKER = ".moe-playground-run"  # written into every run directory made here: only such folders are ever deleted
LOCK_FILE = ".lock"  # in the run directory; holds the pid of the process that has the run
_BOOKKEEPING = (RUN_MARKER, LOCK_FILE)  # a folder holding only these holds no results


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (and nothing was written)."""


class RunDirBusy(RunDirError):
    """Another process holds the run directory's lock."""


class CheckpointError(RunDirError):
    """A checkpoint file is missing or does not load; the message names the file."""


def check_run_name(name: str, key: str = "run_name") -> None:
    """ValueError unless `name` is a plain folder name, so `<parent>/<name>` stays inside `<parent>`."""
    if not name or name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
        raise ValueError(f"{key}={name!r} must be a plain folder name: not empty, not '.' or '..', "
                         "without '/' or '\\'")


def _file_mode(base: int = 0o666) -> int:
    """The mode a plain `open()` (base 0o666) or `mkdir` (0o777) would give: `base` less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, _file_mode())  # mkstemp makes it 0600: collaborators could not read the run
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def check_new_dir(path: Path) -> None:
    """FileExistsError unless `path` is free for a new folder (absent, or an empty folder)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty folder; choose another or remove it")


def atomic_write_dir(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary folder beside `path`, then rename it to `path`, which must not exist
    or be an empty folder: the folder appears complete or not at all, and nothing in it is ever replaced."""
    check_new_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, _file_mode(0o777))
        write(tmp)
        if path.exists():
            path.rmdir()  # fails, keeping it, if something appeared in it meanwhile
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- one process per run directory ------------------------------------------------------

_held: dict[Path, int] = {}  # resolved run directory -> fd of the lock this process holds on it


def _lock(run_dir: Path, flags: int, kind: int) -> int:
    """An fd holding a lock of `kind` (fcntl.LOCK_EX or LOCK_SH) on `run_dir`'s lock file, opened with `flags`;
    RunDirBusy if another process holds the exclusive lock."""
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | flags, _file_mode())
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise RunDirBusy(f"{run_dir} is in use by another process (pid {holder or 'unknown'}); two processes on one run "
                         "would mix their files. Wait for it to end or stop it, or choose another run_name") from None
    return fd


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[Path]:
    """Hold `run_dir`'s lock (creating the folder if needed) until the block ends.

    Raises RunDirBusy at once if another process holds it. Re-entrant within one process:
    an inner `with` on a folder this process already holds does nothing. The lock is an
    `fcntl.flock` on `<run_dir>/.lock`, so it ends with the process however that dies.
    """
    key = run_dir.resolve()
    if key in _held:
        yield run_dir
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = _lock(run_dir, os.O_CREAT, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd
    try:
        yield run_dir
    finally:
        del _held[key]
        os.close(fd)  # releases the lock


# ---- using a run directory ----------------------------------------------------------------


def _holds_results(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name not in _BOOKKEEPING for p in run_dir.iterdir())


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Raise RunDirError unless `run_dir` may be used as asked; touches nothing.

    A new or empty folder is fine. An existing run needs `resume` (continue it)
    or `overwrite` (start again, deleting it); otherwise we refuse, naming both.
    `overwrite` deletes only a folder this project made (it holds RUN_MARKER).
    """
    if resume and overwrite:
        raise RunDirError("resume and overwrite exclude each other: pick one")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a run directory; choose another run_name")
    if (run_dir / LOCK_FILE).is_file() and run_dir.resolve() not in _held:  # in use: say so before any work
        os.close(_lock(run_dir, 0, fcntl.LOCK_SH))  # shared: checks by the ranks of one run do not collide
    if resume:
        if not checkpoint_candidates(run_dir):
            raise RunDirError(f"cannot resume {run_dir}: it has no checkpoint")
    elif _holds_results(run_dir):
        if not overwrite:
            state = "a finished run" if (run_dir / DONE_MARKER).exists() else "an unfinished run"
            raise RunDirError(
                f"{run_dir} already holds {state}; continue it with --resume, delete it and start "
                "again with --overwrite, or choose another run_name"
            )
        check_deletable(run_dir)


def check_deletable(run_dir: Path) -> None:
    """RunDirError unless `run_dir` is a real folder holding RUN_MARKER: a run directory of this project."""
    if run_dir.is_symlink():
        raise RunDirError(f"will not delete {run_dir}: it is a symbolic link, not a run directory made here; "
                          "choose another run_name or out_dir")
    if not (run_dir / RUN_MARKER).is_file():
        raise RunDirError(f"will not delete {run_dir}: it is not a run directory made by this project (it has no "
                          f"{RUN_MARKER} file), so nothing was deleted; choose another run_name or out_dir, "
                          "or move the folder away yourself")


def clear_run_dir(run_dir: Path) -> None:
    """Delete everything in `run_dir`, a run directory of this project (see `check_deletable`).

    Holds the folder's lock meanwhile, and the lock of every run directory inside it (a sweep's
    runs), so a run in use by another process is never deleted under it: RunDirBusy instead.
    A folder holding nothing but the marker and lock needs no deleting and may lack the marker.
    """
    if not _holds_results(run_dir):
        return
    check_deletable(run_dir)
    with ExitStack() as locks:
        for marker in sorted(run_dir.rglob(RUN_MARKER)):
            locks.enter_context(run_dir_lock(marker.parent))
        for entry in run_dir.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def mark_run_dir(run_dir: Path) -> None:
    """Create `run_dir` if needed and mark it as a run directory of this project (which `clear_run_dir` may delete)."""
    if not (run_dir / RUN_MARKER).is_file():
        atomic_write_text(run_dir / RUN_MARKER, "A run directory of moe-playground: its --overwrite may delete this folder.\n")


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """`check_run_dir`, then create and mark the folder; only `overwrite` deletes an existing run.

    Holds the folder's lock meanwhile (RunDirBusy if another process has it); call it inside
    `with run_dir_lock(run_dir):` to keep the lock for the whole run.
    """
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)  # before the lock creates the folder
    with run_dir_lock(run_dir):
        check_run_dir(run_dir, resume=resume, overwrite=overwrite)  # again: it may have changed before we had the lock
        if overwrite:
            clear_run_dir(run_dir)
        mark_run_dir(run_dir)


# ---- checkpoints ----------------------------------------------------------------------------


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """Checkpoint folders, newest first, up to the one `latest` names (newer ones are saves that never completed)."""
    steps = sorted((p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir()), reverse=True)
    latest = latest_checkpoint(run_dir)
    return [p for p in steps if latest is None or p.name <= latest.name]


def save_checkpoint(run_dir: Path, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any], keep: int = 1) -> Path:
    """Write `step_<step>/`, point `latest` at it, then prune: keep the newest `keep`, drop any from after `step`
    (left by a run that resumed from an older checkpoint)."""
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
    kept = [p for p in steps if p.name <= path.name][-keep:]
    for old in steps:
        if old not in kept:
            shutil.rmtree(old)
    return path


def load_checkpoint(path: Path, required: Iterable[str] = ()) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and training state of one checkpoint folder; never unpickles code.

    CheckpointError names the file that is missing or does not load, or the `required` state keys it lacks."""
    loaded = []
    for name, load in (("model.safetensors", lambda f: load_file(str(f))), ("state.pt", lambda f: torch.load(f, weights_only=True))):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        try:
            loaded.append(load(f))
        except Exception as e:  # safetensors, zip and unpickling errors come in many types
            raise CheckpointError(f"{f} is broken ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    weights, state = loaded
    lacking = [k for k in required if not (isinstance(state, dict) and k in state)]
    if lacking:
        raise CheckpointError(f"{path / 'state.pt'} is broken: it lacks {', '.join(lacking)}")
    return weights, state


def load_newest_good_checkpoint(run_dir: Path, required: Iterable[str] = ()) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """The newest checkpoint that loads (see `load_checkpoint`): (folder, weights, state, why each newer one was skipped).

    CheckpointError, listing every problem, when none loads."""
    problems = []
    for path in checkpoint_candidates(run_dir):
        try:
            weights, state = load_checkpoint(path, required)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        return path, weights, state, problems
    raise CheckpointError(f"cannot resume {run_dir}: no checkpoint loads ({'; '.join(problems) or 'there is none'}); "
                          "start again with --overwrite or choose another run_name")
