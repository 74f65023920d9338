"""FramePack at toy scale: next-section prediction from packed frame context.

Zhang & Agrawala, "Packing Input Frame Context in Next-Frame Prediction Models for
Video Generation" (arXiv 2504.12626). The model predicts a *section* of S frames at
once from

  - the anchor: the video's first frame at full resolution, always present;
  - the known frames on each side of the section, nearest first: the past and, for the
    anti-drifting orders, the future. Each side is *packed* by the schedule: the nearest
    frames go through the fine patchifier (1, p, p), older ones through coarser 3-D
    kernels (kt, kh, kw), so a frame costs 1, 1/8, 1/64, ... of the fine tokens
    (FramePack's (1,2,2), (2,4,4), (4,8,8) on latents). Frames beyond the schedule
    are dropped, so the context is bounded however long the video is. A last stage
    with `frames: 0` takes every remaining frame: no packing bound (the reference).

The coarse patchifiers start as the fine one with each weight spread over its block and
divided by the block's volume, i.e. the fine patchifier applied to the average-pooled
input (FramePack initialises its 2x/4x projections the same way).

The section's query tokens start from the known frame nearest to it, and the output is a
change to that frame: a plain regression (MSE) by default, or (`head: flow`) rectified flow from
noise, sampled in `flow_steps` Euler steps, so sections are drawn rather than averaged.

Positions: fixed sinusoidal encodings of (time relative to the section's first frame,
row, column) on the fine token grid. A compressed token gets the mean of the encodings
its kernel covers, so it keeps its true (average) time position. Relative times are
clipped to +-max_offset, the longest distance seen in training.

Shape legend: B batch, N frames of one side, S section frames, H W pixels,
T tokens, D model width, G kernel groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moe_playground.models.validate import check

# ---- config ------------------------------------------------------------------------------------

HEADS = ("regression", "flow")


@dataclass
class Stage:
    kernel: list[int] = field(default_factory=lambda: [1, 8, 8])  # (frames, pixels high, pixels wide)
    frames: int = 1  # frames of a side this stage packs, a multiple of kernel[0]; 0 = all that remain (last stage only)


def _default_schedule() -> list[Stage]:
    # 1x, 1/8 and 1/64 of the fine tokens per frame, as FramePack's (1,2,2), (2,4,4), (4,8,8)
    return [Stage([1, 8, 8], 2), Stage([2, 16, 16], 4), Stage([4, 32, 32], 16)]


@dataclass
class FramePackConfig:
    frame_size: int = 32        # frames are frame_size x frame_size, one channel
    patch: int = 8              # the fine patchifier is (1, patch, patch): (frame_size / patch)^2 tokens per frame
    section: int = 2            # frames predicted at once
    schedule: list[Stage] = field(default_factory=_default_schedule)  # packing of each side, nearest frames first
    max_offset: int = 32        # relative times are clipped to +-max_offset (set to the training clip length)
    d_model: int = 96
    n_layer: int = 4
    n_head: int = 4
    ffn_hidden: int = 256
    head: str = "regression"    # "regression": the section itself (MSE) | "flow": a few-step flow-matching sampler
    flow_steps: int = 4         # head=flow: Euler steps per sampled section

    def __post_init__(self) -> None:
        check(self.patch >= 1 and self.frame_size % self.patch == 0,
              f"model.patch={self.patch} must divide model.frame_size={self.frame_size}")
        check(self.section >= 1, f"model.section={self.section} must be >= 1")
        check(self.max_offset >= 1, f"model.max_offset={self.max_offset} must be >= 1")
        check(len(self.schedule) >= 1, "model.schedule must have at least one stage")
        for i, st in enumerate(self.schedule):
            key = f"model.schedule[{i}]"
            check(len(st.kernel) == 3 and all(k >= 1 for k in st.kernel),
                  f"{key}.kernel={st.kernel} must be three sizes >= 1: (frames, height, width)")
            kt, kh, kw = st.kernel
            for name, k in (("height", kh), ("width", kw)):
                check(k % self.patch == 0 and self.frame_size % k == 0,
                      f"{key}.kernel {name} {k} must be a multiple of model.patch={self.patch} and divide "
                      f"model.frame_size={self.frame_size}")
            check(st.frames >= 0 and st.frames % kt == 0,
                  f"{key}.frames={st.frames} must be a multiple of the kernel's {kt} frames (0 = all remaining)")
            check(st.frames > 0 or i == len(self.schedule) - 1, f"{key}.frames=0 (all remaining) is allowed in the last stage only")
        check(self.d_model % self.n_head == 0 and self.d_model % 8 == 0,
              f"model.d_model={self.d_model} must be a multiple of 8 and of model.n_head={self.n_head}")
        check(self.n_layer >= 1 and self.ffn_hidden >= 1, "model.n_layer and model.ffn_hidden must be >= 1")
        check(self.head in HEADS, f"model.head={self.head!r} must be one of {HEADS}")
        check(self.flow_steps >= 1, f"model.flow_steps={self.flow_steps} must be >= 1")

    @property
    def grid(self) -> int:
        """Fine tokens along each side of a frame."""
        return self.frame_size // self.patch

    @property
    def max_side_frames(self) -> int | None:
        """Frames of one side the schedule can hold; None when a stage takes all that remain."""
        return None if any(st.frames == 0 for st in self.schedule) else sum(st.frames for st in self.schedule)

    def side_tokens(self, n_frames: int) -> int:
        """Tokens the packed side of `n_frames` known frames costs (frames left out of a kernel group cost none)."""
        tokens, i = 0, 0
        for st in self.schedule:
            kt, kh, kw = st.kernel
            n = n_frames - i if st.frames == 0 else min(st.frames, n_frames - i)
            tokens += (n // kt) * (self.frame_size // kh) * (self.frame_size // kw)
            i += n
        return tokens

    def context_tokens(self, n_past: int, n_future: int) -> int:
        """Every conditioning token: the anchor and both packed sides."""
        return self.grid ** 2 + self.side_tokens(n_past) + self.side_tokens(n_future)


@dataclass
class Context:
    """What one section is predicted from; times are relative to the section's first frame."""

    anchor_BHW: torch.Tensor
    anchor_t: int
    past_BNHW: torch.Tensor     # nearest first
    past_t: list[int]
    future_BNHW: torch.Tensor   # nearest first
    future_t: list[int]


# ---- positions -----------------------------------------------------------------------------------


def sincos(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., dim) sinusoidal encoding of positions `pos` (...)."""
    freqs = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = pos.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def fine_positions(times: torch.Tensor, grid: int, d_model: int) -> torch.Tensor:
    """(N, grid, grid, D) encodings of every fine token of frames at `times` (N,): half time, a quarter each axis."""
    d_t, d_s = d_model // 2, d_model // 4
    ys = torch.arange(grid, dtype=torch.float32)
    t_N1D = sincos(times, d_t)[:, None, None, :].expand(-1, grid, grid, -1)
    y_GGD = sincos(ys, d_s)[:, None, :].expand(-1, grid, -1)
    x_GGD = sincos(ys, d_s)[None, :, :].expand(grid, -1, -1)
    return torch.cat([t_N1D, y_GGD.expand(len(times), -1, -1, -1), x_GGD.expand(len(times), -1, -1, -1)], dim=-1)


# ---- the model -------------------------------------------------------------------------------


def kernel_name(kernel: list[int] | tuple[int, ...]) -> str:
    return "x".join(map(str, kernel))


class FramePack(nn.Module):
    def __init__(self, cfg: FramePackConfig):
        super().__init__()
        self.cfg = cfg
        p, D = cfg.patch, cfg.d_model
        self.fine = [1, p, p]
        kernels = {kernel_name(self.fine): self.fine} | {kernel_name(st.kernel): st.kernel for st in cfg.schedule}
        self.patchify = nn.ModuleDict({name: nn.Conv3d(1, D, k, stride=k) for name, k in kernels.items()})
        # what a token is: anchor, one per schedule stage, or a query of the section to predict
        self.kind_anchor = nn.Parameter(torch.zeros(D))
        self.kind_stage = nn.Parameter(torch.zeros(len(cfg.schedule), D))
        self.query = nn.Parameter(torch.zeros(D))
        layer = nn.TransformerEncoderLayer(D, cfg.n_head, cfg.ffn_hidden, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, p * p)
        if cfg.head == "flow":  # the noisy section and the flow time enter the query tokens
            self.noisy = nn.Conv3d(1, D, self.fine, stride=self.fine)
            self.flow_time = nn.Linear(D, D)
        self.reset_coarse_patchifiers()

    @torch.no_grad()
    def reset_coarse_patchifiers(self) -> None:
        """Each coarse kernel := the fine one with every weight spread over its block / block volume."""
        fine = self.patchify[kernel_name(self.fine)]
        for name, conv in self.patchify.items():
            kt, kh, kw = conv.kernel_size
            r = (kt, kh // self.cfg.patch, kw // self.cfg.patch)
            w = fine.weight
            for dim, n in zip((2, 3, 4), r):
                w = w.repeat_interleave(n, dim=dim)
            conv.weight.copy_(w / math.prod(r))
            conv.bias.copy_(fine.bias)

    def _positions(self, times: list[int], kernel: list[int] | tuple[int, ...]) -> torch.Tensor:
        """(G * h * w, D) encodings of the tokens a kernel makes of frames at `times` (G groups of kt, in order)."""
        kt, kh, kw = kernel
        t = torch.tensor(times).clamp(-self.cfg.max_offset, self.cfg.max_offset)
        pe = fine_positions(t, self.cfg.grid, self.cfg.d_model)  # (G*kt, g, g, D)
        pe = pe.unflatten(0, (-1, kt)).permute(0, 4, 1, 2, 3)  # (G, D, kt, g, g)
        pe = F.avg_pool3d(pe, (kt, kh // self.cfg.patch, kw // self.cfg.patch))  # pooled: true mean positions
        return pe.flatten(2).transpose(1, 2).flatten(0, 1)

    def _tokens(self, frames_BNHW: torch.Tensor, times: list[int], kernel: list[int] | tuple[int, ...]) -> torch.Tensor:
        """(B, G * h * w, D): frames in groups of kt through the kernel, plus their pooled positions."""
        B, N, H, W = frames_BNHW.shape
        kt = kernel[0]
        x = frames_BNHW.reshape(B * N // kt, 1, kt, H, W)
        tok = self.patchify[kernel_name(kernel)](x)  # (B*G, D, 1, h, w)
        tok = tok.flatten(2).transpose(1, 2).reshape(B, -1, self.cfg.d_model)
        return tok + self._positions(times, kernel)

    def pack(self, frames_BNHW: torch.Tensor, times: list[int]) -> torch.Tensor:
        """(B, T, D) tokens of one side (frames nearest first) packed by the schedule; frames that do not fill
        a kernel group, or lie beyond the schedule, are left out."""
        out, i, N = [], 0, len(times)
        for s, st in enumerate(self.cfg.schedule):
            kt = st.kernel[0]
            n = N - i if st.frames == 0 else min(st.frames, N - i)
            take = n // kt * kt
            if take:
                idx = torch.arange(i, i + take).view(-1, kt)
                order = torch.tensor([times[j] for j in idx.flatten().tolist()]).view(-1, kt).argsort(dim=1)
                idx = idx.gather(1, order).flatten()  # each group in time order
                out.append(self._tokens(frames_BNHW[:, idx], [times[j] for j in idx.tolist()], st.kernel)
                           + self.kind_stage[s])
            i += n
        return torch.cat(out, dim=1) if out else frames_BNHW.new_zeros(frames_BNHW.shape[0], 0, self.cfg.d_model)

    def context(self, ctx: Context) -> torch.Tensor:
        """(B, T, D): anchor, packed past, packed future."""
        anchor = self._tokens(ctx.anchor_BHW[:, None], [ctx.anchor_t], self.fine) + self.kind_anchor
        return torch.cat([anchor, self.pack(ctx.past_BNHW, ctx.past_t), self.pack(ctx.future_BNHW, ctx.future_t)], dim=1)

    @staticmethod
    def nearest_frame(ctx: Context) -> torch.Tensor:
        """(B, H, W): the known frame nearest in time to the section (past, future or anchor; the past wins ties)."""
        candidates = [(abs(ctx.anchor_t), 2, ctx.anchor_BHW)]
        if ctx.past_t:
            candidates.append((abs(ctx.past_t[0]), 0, ctx.past_BNHW[:, 0]))
        if ctx.future_t:
            candidates.append((abs(ctx.future_t[0]), 1, ctx.future_BNHW[:, 0]))
        return min(candidates, key=lambda c: c[:2])[2]

    def forward(self, ctx: Context, noisy_BSHW: torch.Tensor | None = None, t_B: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, H, W): the predicted change to the known frame nearest the section. Its query tokens start from
        that frame (as a diffusion model's start from noisy latents); with the flow head they also carry the noisy
        change `noisy_BSHW` at flow time `t_B`."""
        c, g, p = self.cfg, self.cfg.grid, self.cfg.patch
        cond_BTD = self.context(ctx)
        B, S = cond_BTD.shape[0], c.section
        near_BHW = self.nearest_frame(ctx)
        q_BTD = self._tokens(near_BHW[:, None].expand(-1, S, -1, -1), list(range(S)), self.fine) + self.query
        if c.head == "flow":
            noisy = self.noisy(noisy_BSHW.reshape(B * S, 1, 1, *noisy_BSHW.shape[-2:]))  # (B*S, D, 1, g, g)
            q_BTD = q_BTD + noisy.flatten(2).transpose(1, 2).reshape(B, -1, c.d_model)
            q_BTD = q_BTD + self.flow_time(sincos(1000 * t_B, c.d_model))[:, None]
        x = self.blocks(torch.cat([cond_BTD, q_BTD], dim=1))
        y = self.head(self.norm(x[:, cond_BTD.shape[1]:]))  # (B, S*g*g, p*p)
        y = y.view(B, S, g, g, p, p).permute(0, 1, 2, 4, 3, 5)
        return y.reshape(B, S, g * p, g * p)

    def loss(self, ctx: Context, target_BSHW: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Training loss of one section: MSE of the predicted change from the nearest known frame. Flow: the
        change is predicted from a noisy copy at a uniform flow time (rectified flow with a clean-target output,
        so the narrow tokens need not carry the noise through)."""
        change = target_BSHW - self.nearest_frame(ctx)[:, None]
        if self.cfg.head == "regression":
            return F.mse_loss(self(ctx), change)
        noise = torch.randn(change.shape, generator=gen)
        t_B = torch.rand(change.shape[0], generator=gen)
        t = t_B[:, None, None, None]
        return F.mse_loss(self(ctx, (1 - t) * noise + t * change, t_B), change)

    @torch.no_grad()
    def predict(self, ctx: Context, gen: torch.Generator | None = None) -> torch.Tensor:
        """(B, S, H, W) the section in [0, 1]: the regression output, or `flow_steps` Euler steps from noise along
        the velocity (predicted change - x) / (1 - t)."""
        near = self.nearest_frame(ctx)[:, None]
        if self.cfg.head == "regression":
            return (near + self(ctx)).clamp(0, 1)
        B, S, n = near.shape[0], self.cfg.section, self.cfg.flow_steps
        x = torch.randn((B, S, *near.shape[-2:]), generator=gen)
        for k in range(n):
            t = k / n
            x = x + (self(ctx, x, torch.full((B,), t)) - x) / (1 - t) / n
        return (near + x).clamp(0, 1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
