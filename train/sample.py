"""Sample from a trained run, streaming tokens as they come (KV cache; dense and MoE models).

    python -m train.sample runs/<run> --prompt "12+34=" [--max-new-tokens 64] [--temperature 0.8] [--top-k 20] [--seed 0]

--temperature 0 decodes greedily (the same tokens as the exported model's generate(do_sample=False)).
"""

from __future__ import annotations

import argparse
import sys

import torch

from moe_playground.train.checkpoint import RunDirError
from moe_playground.train.sampling import check_lengths, generate
from moe_playground.train.trained import load_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.sample", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory, e.g. runs/dense")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
        p.error(f"--temperature {args.temperature} must be >= 0 and --top-k {args.top_k} >= 1")
    torch.set_num_threads(1)
    try:
        run = load_run(args.run)
        prompt = run.tokenizer.encode(args.prompt)
        check_lengths(len(prompt), args.max_new_tokens, run.cfg.model.max_seq_len)
    except (RunDirError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(args.prompt)
    new, shown = [], ""
    for token in generate(run.model, prompt, args.max_new_tokens, args.temperature, args.top_k,
                          torch.Generator().manual_seed(args.seed)):
        new.append(token)
        text = run.tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # hold back a character whose bytes have not all come yet
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(run.tokenizer.decode(new)[len(shown):] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
