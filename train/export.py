"""Export a trained run as a transformers model folder: no custom code, loads offline.

    python -m train.export runs/<run> --out <dir>

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("<dir>"); tok = AutoTokenizer.from_pretrained("<dir>")

Dense models become LlamaForCausalLM; MoE models the transformers architecture whose forward equals
ours for their config (train/hf/convert.py). Before anything is written, the exported model's logits
are checked against ours (fp32, max |difference| <= 1e-4); a config no architecture expresses stops
with an error naming what each lacks. <dir> must not exist or be empty; it appears complete or not at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moe_playground.train.checkpoint import RunDirError, atomic_write_dir, check_new_dir
from moe_playground.train.hf.convert import Unexportable, choose_arch, hf_config, to_hf_state
from moe_playground.train.hf.tokenizer import to_fast_tokenizer
from moe_playground.train.trained import TrainedRun, load_run

TOLERANCE = 1e-4  # max |logit difference| in fp32 an export may have


def to_transformers(run: TrainedRun):
    """(transformers model in fp32 eval mode, architecture) for the run; Unexportable when none expresses it."""
    from transformers import AutoModelForCausalLM
    m, e = run.cfg.model, run.cfg.moe
    arch = choose_arch(m, e)
    config = hf_config(m, e, arch)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf.load_state_dict(to_hf_state(m, e, arch, run.model.state_dict()), strict=True)
    return hf.eval(), arch


def logit_difference(run: TrainedRun, hf, seed: int = 0) -> float:
    """Max |ours - transformers'| over the logits of two random sequences as long as the model takes (<= 64)."""
    idx = torch.randint(run.cfg.model.vocab_size, (2, min(64, run.cfg.model.max_seq_len)),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (run.model(idx).logits - hf(idx).logits).abs().max().item()


def export(run_dir: str | Path, out: str | Path) -> dict:
    """Write the export of `run_dir` to `out`; returns what was written and how closely it matches."""
    out = Path(out)
    check_new_dir(out)  # before any work; atomic_write_dir checks again
    run = load_run(run_dir)
    hf, arch = to_transformers(run)
    diff = logit_difference(run, hf)
    if not diff <= TOLERANCE:
        raise Unexportable(f"{arch.cls_name} computes different logits from the run's (max |difference| {diff:.3g} > "
                           f"{TOLERANCE}); nothing written")
    tok = to_fast_tokenizer(run.tokenizer, run.cfg.model.max_seq_len)

    def write(folder: Path) -> None:
        hf.save_pretrained(folder)
        tok.save_pretrained(folder)

    atomic_write_dir(out, write)
    return {"out": str(out), "architecture": arch.cls_name, "step": run.step, "max_logit_difference": diff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory, e.g. runs/dense")
    p.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        done = export(args.run, args.out)
    except (RunDirError, Unexportable, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.run} (step {done['step']}) as {done['architecture']} to {done['out']}; "
          f"max |logit difference| {done['max_logit_difference']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
