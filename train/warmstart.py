"""Start a run from trained weights (`init_from`), optionally upcycled into an MoE (`upcycle`).

`init_from` names a local transformers folder of the Llama family (any folder `from_pretrained`
reads, e.g. base_models/smollm2-135m-instruct; its tokenizer with data.tokenizer=pretrained) or a
finished run directory of ours. The source decides the architecture: `resolve` copies its model
config into the run's config (and, with `upcycle`, sizes the MoE experts from its FFN), so the saved
config.yaml says what was trained. `initial_weights` then gives the state dict the run starts from.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from moe_playground.models.upcycle import Upcycling, upcycle_experts
from moe_playground.train.checkpoint import DONE_MARKER, CheckpointError, load_newest_good_checkpoint
from moe_playground.train.config import ConfigError, load_config
from moe_playground.train.hf.convert import from_hf_config, from_hf_state

LAYOUT = ("ffn", "moe_layer_freq", "first_k_dense")  # what an upcycled model takes from the run's config


def source_path(cfg) -> Path:
    """init_from with "{seed}" as train.seed and "{out_dir}" as out_dir (a sweep's directory, in a sweep)."""
    return Path(cfg.init_from.format(seed=cfg.train.seed, out_dir=cfg.out_dir))


def is_transformers_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve(cfg):
    """`cfg` with the model (and with upcycling, the MoE expert sizes) of its `init_from` source.
    ValueError naming the problem, before anything is written, for a source that cannot start this run."""
    if cfg.init_from is None:
        return cfg
    src = source_path(cfg)
    how = Upcycling.parse(cfg.upcycle) if cfg.upcycle else None
    if is_transformers_folder(src):
        from transformers import AutoConfig
        if cfg.data.tokenizer != "pretrained":
            raise ValueError(f"init_from={src} is a transformers folder: set data.tokenizer=pretrained (its tokenizer)")
        try:
            hf = AutoConfig.from_pretrained(src, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"init_from={src}: its config.json does not load ({e})") from None
        model = from_hf_config(hf, cfg.model)
        if how is None and cfg.model.ffn != "dense":
            raise ValueError(f"init_from={src} is a dense model: model.ffn={cfg.model.ffn!r} needs upcycle=copy, "
                             "drop:<r> or granular:<G>")
    elif (src / "config.yaml").is_file():
        from moe_playground.train.lm import LMRunConfig
        if not (src / DONE_MARKER).exists():
            raise ValueError(f"init_from={src}: that run has not finished (no {DONE_MARKER} file)")
        try:
            source = load_config(LMRunConfig, src / "config.yaml")
        except ConfigError as e:
            raise ValueError(f"init_from={src}: its config.yaml does not load ({e})") from None
        if cfg.data.tokenizer != source.data.tokenizer:
            raise ValueError(f"data.tokenizer={cfg.data.tokenizer!r} must be the init_from run's "
                             f"({source.data.tokenizer!r}): the weights belong to its tokens")
        if how is None:  # continue the source's model as it is
            return replace(cfg, model=source.model, moe=source.moe)
        if source.model.ffn != "dense":
            raise ValueError(f"init_from={src} has model.ffn={source.model.ffn!r}: upcycling starts from a dense model")
        model = source.model
    else:
        raise ValueError(f"init_from={src} is neither a transformers model folder (config.json) nor a run directory "
                         "of python -m train.lm (config.yaml)")
    if how is None:
        return replace(cfg, model=model)
    if cfg.model.ffn != "moe":
        raise ValueError(f"upcycle={cfg.upcycle!r} makes MoE layers: set model.ffn=moe")
    if cfg.moe.n_shared_experts:
        raise ValueError(f"upcycle={cfg.upcycle!r} builds routed experts only: set moe.n_shared_experts=0")
    if model.ffn_hidden % how.granularity:
        raise ValueError(f"upcycle={cfg.upcycle!r}: G must divide the dense FFN's {model.ffn_hidden} hidden units")
    model = replace(model, **{k: getattr(cfg.model, k) for k in LAYOUT})
    return replace(cfg, model=model, moe=replace(cfg.moe, expert_hidden=model.ffn_hidden, granularity=how.granularity))


def initial_weights(cfg) -> dict[str, torch.Tensor]:
    """What a resolved `cfg` starts from: every weight its source gives (an upcycled MoE layer's router is
    not among them; the new model's own initialisation keeps it). Loaded before the run directory is touched."""
    src = source_path(cfg)
    if is_transformers_folder(src):
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True)
        weights = from_hf_state(replace(cfg.model, ffn="dense"), hf.state_dict())
    else:
        try:
            _, weights, _, _ = load_newest_good_checkpoint(src)
        except CheckpointError as e:
            raise ValueError(f"init_from={src}: {e}") from None
    if not cfg.upcycle:
        return weights
    how, gen = Upcycling.parse(cfg.upcycle), torch.Generator().manual_seed(cfg.train.seed)
    out = {}
    for k, v in weights.items():
        i = int(k.split(".")[1]) if k.startswith("blocks.") else -1
        if i < 0 or ".ffn." not in k or not cfg.model.is_sparse_layer(i):
            out[k] = v
        elif k.endswith("ffn.gate_up.weight"):
            out[f"blocks.{i}.ffn.experts.w_gate_up"], out[f"blocks.{i}.ffn.experts.w_down"] = upcycle_experts(
                v, weights[f"blocks.{i}.ffn.down.weight"], cfg.moe.n_routed_experts, how, gen)
    return out


def load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load `weights` into `model`; what they lack must be what upcycling leaves to the model's initialisation
    (the routers). ValueError naming the keys otherwise."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    left = [k for k in missing if ".router." not in k]
    if left or unexpected:
        raise ValueError(f"init_from weights do not fit the model: missing {left[:5]}, unexpected {unexpected[:5]}")
