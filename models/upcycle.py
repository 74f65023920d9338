"""Dense-to-MoE upcycling: routed experts made from a trained dense SwiGLU.

- copy (sparse upcycling, Komatsuzaki et al. 2022, arXiv 2212.05055): every expert is the dense FFN.
  With renormalised top-k weights (they sum to 1) the layer computes the dense FFN exactly at step 0,
  whatever the fresh router picks.
- drop:<r> (Drop-Upcycling, Nakamura et al. 2025, arXiv 2502.19261): copies, then in each expert a
  random fraction r of the hidden units (the same units in gate, up and down) is re-initialised from
  a normal with the mean and std of the original matrix, so experts start diverse.
- granular:<G> (granular upcycling, as in Megatron-Core): each copy is cut into G experts of H/G hidden
  units (MoEConfig.granularity=G); each cut's down projection is scaled by G, so a token that picks
  all G cuts of a copy with equal weights (1/G each after renormalisation) gets the dense FFN.

Shapes: the dense SwiGLU stores gate_up (2H, D) and down (D, H) as nn.Linear weights ([gate | up] fused);
the routed experts store w_gate_up (E, D, 2H/G) and w_down (E, H/G, D) (models/moe.py, (in, out)).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

METHODS = ("copy", "drop:<r>", "granular:<G>")


@dataclass(frozen=True)
class Upcycling:
    method: str            # "copy" | "drop" | "granular"
    drop_ratio: float = 0.0
    granularity: int = 1

    @classmethod
    def parse(cls, spec: str) -> Upcycling:
        """'copy', 'drop:<r>' with 0 < r <= 1, or 'granular:<G>' with integer G >= 2; ValueError naming the forms."""
        m = re.fullmatch(r"(copy)|drop:([0-9.]+)|granular:([0-9]+)", spec)
        r = float(m.group(2)) if m and m.group(2) else None
        g = int(m.group(3)) if m and m.group(3) else None
        if not m or (r is not None and not 0 < r <= 1) or (g is not None and g < 2):
            raise ValueError(f"upcycle={spec!r} must be one of {', '.join(METHODS)} (0 < r <= 1, integer G >= 2)")
        if r is not None:
            return cls("drop", drop_ratio=r)
        return cls("granular", granularity=g) if g is not None else cls("copy")


def upcycle_experts(gate_up_2HD: torch.Tensor, down_DH: torch.Tensor, n_copies: int, how: Upcycling,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_gate_up (E, D, 2H/G), w_down (E, H/G, D)) for E = n_copies * G routed experts from one dense SwiGLU."""
    gate_HD, up_HD = gate_up_2HD.chunk(2)
    H, G = gate_HD.shape[0], how.granularity
    gate_CHD, up_CHD = gate_HD.expand(n_copies, -1, -1).clone(), up_HD.expand(n_copies, -1, -1).clone()
    down_CDH = down_DH.expand(n_copies, -1, -1).clone()
    if how.method == "drop":
        n_drop = round(how.drop_ratio * H)
        for c in range(n_copies):
            units = torch.randperm(H, generator=generator)[:n_drop]
            for w_CHD, src in ((gate_CHD, gate_HD), (up_CHD, up_HD)):
                w_CHD[c, units] = _like(src, (n_drop, src.shape[1]), generator)
            down_CDH[c, :, units] = _like(down_DH, (down_DH.shape[0], n_drop), generator)
    # cut each copy's hidden units into G consecutive experts: (C, H, D) -> (C*G, H/G, D)
    gate_EhD, up_EhD = (w.reshape(n_copies * G, H // G, -1) for w in (gate_CHD, up_CHD))
    down_EDh = down_CDH.unflatten(2, (G, H // G)).transpose(1, 2).reshape(n_copies * G, -1, H // G) * G
    w_gate_up = torch.cat([gate_EhD, up_EhD], dim=1).transpose(1, 2)  # (E, D, 2H/G): [gate | up] per expert
    return w_gate_up.contiguous(), down_EDh.transpose(1, 2).contiguous()


def _like(w: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Fresh values with the mean and std of the matrix `w` (Drop-Upcycling's re-initialisation)."""
    return torch.randn(shape, generator=generator, dtype=w.dtype) * w.std() + w.mean()
