"""LoRA mechanics for generated (hypernetwork) adapters.

peft trains one LoRA at a time and bakes it into the model. A parameter
translator instead produces a different LoRA for every document in a batch, and
its gradients must flow back through A and B into the translator. So here the
LoRA is applied in factored form by forward hooks on the adapted nn.Linear
layers, for as long as a context manager is active:

    y = x W^T + b + scaling * (x A^T) B^T,      scaling = lora_alpha / r

exactly as peft computes it (peft's default, non-rsLoRA scaling), never as a
dense delta W + scaling * B A. peft stays the tool for training per-document
LoRAs (`loras_from_peft` reads them) and for exporting a generated LoRA as a
standard adapter (`export_peft_adapter`).

A LoRA set is a dict `Loras`: target module path -> (A, B), with
A: [r, in] and B: [out, r] (one LoRA for the whole batch) or
A: [N, r, in] and B: [N, out, r] (one LoRA per batch row, N = batch size).
Tensor names carry their shape: N batch rows, S positions, I in features,
O out features, R rank.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

Loras = dict[str, tuple[Tensor, Tensor]]

# -----------------------------------------------------------------------------
# which Linear layers are adapted


@dataclass(frozen=True)
class LoraTarget:
    """One adapted nn.Linear of the base model."""

    name: str  # module path in the HF model, e.g. "model.layers.0.mlp.down_proj"
    layer: int  # transformer layer index (first numbered part of the path)
    module: str  # leaf name, e.g. "down_proj"
    in_features: int
    out_features: int


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of target_modules: the full path, or a suffix after a dot
    return name == target or name.endswith("." + target)


def _layer_index(name: str) -> int | None:
    """The first numbered path component: "model.layers.3.mlp.up_proj" -> 3."""
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def find_lora_targets(model: nn.Module, target_modules: list[str], layers: list[int] | None = None) -> list[LoraTarget]:
    """The Linear layers that peft would adapt for `target_modules` (and `layers_to_transform=layers`,
    None or [] = every layer), in model order.

    Raises ValueError naming the entries that matched nothing (and the Linear
    leaf names the model does have), a match that is not an nn.Linear, a
    match outside the numbered transformer layers, or a layer the model lacks.
    """
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"target_modules must be a non-empty list of module names, got {target_modules!r}")
    modules = dict(model.named_modules())
    unmatched = [t for t in target_modules if not any(_matches(name, t) for name in modules)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"target_modules {unmatched} match no module of {type(model).__name__}; "
            f"its nn.Linear leaf names are: {', '.join(leaves)}"
        )
    targets = []
    for name, module in modules.items():
        if not any(_matches(name, t) for t in target_modules):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target module {name} is a {type(module).__name__}; only nn.Linear layers can be adapted")
        layer = _layer_index(name)
        if layer is None:
            raise ValueError(f"target module {name} is not inside a numbered transformer layer (e.g. model.layers.<i>.)")
        targets.append(LoraTarget(name, layer, name.rsplit(".", 1)[-1], module.in_features, module.out_features))
    if layers:
        have = sorted({t.layer for t in targets})
        if absent := sorted(set(layers) - set(have)):
            raise ValueError(f"LoRA layers {absent} do not exist in {type(model).__name__}: its layers are {have[0]}..{have[-1]}")
        targets = [t for t in targets if t.layer in layers]
    return targets


# -----------------------------------------------------------------------------
# applying LoRAs in factored form


def _check_lora(name: str, linear: nn.Module, A: Tensor, B: Tensor) -> None:
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"LoRA for {name}: the model has no nn.Linear there (found {type(linear).__name__})")
    if A.dim() not in (2, 3) or B.dim() != A.dim():
        raise ValueError(f"LoRA for {name}: A and B must both be 2-D (shared) or 3-D (per sample), got {tuple(A.shape)} and {tuple(B.shape)}")
    r, in_features = A.shape[-2:]
    out_features, r_b = B.shape[-2:]
    if (in_features, out_features, r_b) != (linear.in_features, linear.out_features, r) or A.shape[:-2] != B.shape[:-2]:
        raise ValueError(
            f"LoRA for {name}: expected A [..., r, {linear.in_features}] and B [..., {linear.out_features}, r] "
            f"with the same r and batch, got {tuple(A.shape)} and {tuple(B.shape)}"
        )


def _lora_hook(name: str, A: Tensor, B: Tensor, scaling: float):
    def hook(module: nn.Linear, args: tuple, y: Tensor) -> Tensor:
        x = args[0]
        a, b = A.to(x.dtype), B.to(x.dtype)
        if a.dim() == 2:  # one LoRA for every row
            return y + scaling * (x @ a.T) @ b.T
        if x.shape[0] != a.shape[0]:
            raise ValueError(f"LoRA for {name}: {a.shape[0]} per-sample LoRAs for a batch of {x.shape[0]} rows")
        x_NSI = x.reshape(x.shape[0], -1, x.shape[-1])  # all middle dims are positions of that row
        delta_NSO = (x_NSI @ a.transpose(1, 2)) @ b.transpose(1, 2)  # [N,S,R] then [N,S,O]
        return y + scaling * delta_NSO.reshape(y.shape)

    return hook


@contextmanager
def factored_lora(model: nn.Module, loras: Loras, scaling: float) -> Iterator[nn.Module]:
    """While active, every Linear named in `loras` computes x W^T + b + scaling * (x A^T) B^T.

    Per-sample LoRAs (A [N,r,in], B [N,out,r]) apply row n of the batch with LoRA n;
    shared ones (A [r,in], B [out,r]) apply to every row. Gradients flow into A and B;
    the base weights are not touched, and the hooks are removed on exit.
    """
    modules = dict(model.named_modules())
    for name, (A, B) in loras.items():
        _check_lora(name, modules.get(name), A, B)
    handles = [modules[name].register_forward_hook(_lora_hook(name, A, B, scaling)) for name, (A, B) in loras.items()]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def stack_loras(loras_list: list[Loras]) -> Loras:
    """Per-document LoRAs -> one per-sample set (A [N,r,in], B [N,out,r]) for a batch."""
    names = loras_list[0].keys()
    if any(lo.keys() != names for lo in loras_list):
        raise ValueError("stack_loras: the LoRA sets adapt different modules")
    return {n: (torch.stack([lo[n][0] for lo in loras_list]), torch.stack([lo[n][1] for lo in loras_list])) for n in names}


def flatten_loras(loras: Loras) -> Tensor:
    """Per-sample LoRAs -> one vector per sample [N, P] (modules in sorted order, A then B),
    e.g. for MSE to targets or cosine similarity between documents' LoRAs."""
    return torch.cat([t.flatten(1) for name in sorted(loras) for t in loras[name]], dim=1)


# -----------------------------------------------------------------------------
# peft interop and storage

_PEFT_PREFIX = "base_model.model."  # peft's saved keys: base_model.model.<module path>.lora_A.weight


def loras_from_peft(peft_model: nn.Module) -> Loras:
    """The active adapter of a peft LoRA model as unbatched (A [r,in], B [out,r]) copies."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    loras: Loras = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix(_PEFT_PREFIX).removesuffix(".lora_A.weight")
            B = state[key.replace(".lora_A.weight", ".lora_B.weight")]
            loras[name] = (state[key].detach().clone(), B.detach().clone())
    if not loras:
        raise ValueError("loras_from_peft: the model has no LoRA weights (is it a peft LoRA model?)")
    return loras


def save_loras(path: str | Path, loras: Loras) -> None:
    """safetensors file with keys "<name>.lora_A" and "<name>.lora_B"."""
    tensors = {}
    for name, (A, B) in loras.items():
        tensors[f"{name}.lora_A"] = A.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = B.detach().cpu().contiguous()
    save_file(tensors, str(path))


def load_loras(path: str | Path) -> Loras:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    tensors = load_file(str(path))
    names = {k.removesuffix(".lora_A") for k in tensors if k.endswith(".lora_A")}
    expected = {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    if not names or set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected) or sorted(tensors)[:5]
        raise ValueError(f"{path}: not a LoRA file: keys must come in pairs '<module>.lora_A' / '<module>.lora_B'; problem keys: {odd}")
    return {n: (tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"]) for n in sorted(names)}


def export_peft_adapter(
    loras: Loras, base_model_dir: str | Path, target_modules: list[str], r: int, alpha: float, out_dir: str | Path,
    layers: list[int] | None = None,
) -> None:
    """Write `loras` as a standard peft adapter directory for the model in `base_model_dir`.

    The adapter holds exactly one (A, B) per module peft will adapt for
    `target_modules` and `layers` (checked against the base model's architecture, built on the
    meta device, so no weights are loaded), because peft silently skips keys that
    do not match. A per-sample set with N == 1 is accepted and squeezed. The
    adapter names its base model by absolute path, so
    `AutoPeftModelForCausalLM.from_pretrained(out_dir)` works from any directory.
    """
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model_dir))
    expected = {t.name: t for t in find_lora_targets(skeleton, target_modules, layers)}
    if set(loras) != set(expected):
        missing, extra = sorted(set(expected) - set(loras)), sorted(set(loras) - set(expected))
        raise ValueError(f"export_peft_adapter: LoRA modules do not match target_modules {target_modules}: missing {missing}, unexpected {extra}")
    tensors = {}
    for name, (A, B) in loras.items():
        if A.dim() == 3:
            if A.shape[0] != 1:
                raise ValueError(f"export_peft_adapter: {name} holds {A.shape[0]} per-sample LoRAs; export one document at a time")
            A, B = A[0], B[0]
        t = expected[name]
        if tuple(A.shape) != (r, t.in_features) or tuple(B.shape) != (t.out_features, r):
            raise ValueError(f"export_peft_adapter: {name} needs A [{r}, {t.in_features}] and B [{t.out_features}, {r}], got {tuple(A.shape)} and {tuple(B.shape)}")
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = B.detach().cpu().contiguous()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0, bias="none",
        task_type="CAUSAL_LM", base_model_name_or_path=str(Path(base_model_dir).resolve()),
        layers_to_transform=list(layers) if layers else None,
    )
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
