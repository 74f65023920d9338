"""Sampling orders, and the contexts a section is predicted from in training and in rollouts.

A video of `length` frames starts with `prompt` given frames (the first is the anchor);
the rest is cut into sections of S frames, generated in one of three orders:

  causal         first to last, each section from the packed past (vanilla next-frame
                 prediction: errors feed into every later section, so quality drifts);
  bidirectional  FramePack's anti-drifting order: the first and the last section first,
                 then the sections between, each from the packed past and the already
                 generated end of the video (the future side);
  inverted       FramePack's inverted anti-drifting order: last to first, each section
                 from the anchor and the packed future, ending next to the known start.

Training draws the same kinds of context from ground-truth clips (`draw_known`), so
one model serves every order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moe_playground.models.framepack import Context, FramePack

ORDERS = ("causal", "bidirectional", "inverted")


def section_starts(length: int, prompt: int, section: int) -> list[int]:
    """First frame of each section; ValueError unless the sections tile the frames after the prompt."""
    if length <= prompt or (length - prompt) % section:
        raise ValueError(f"a video of {length} frames with {prompt} prompt frames does not split into sections of "
                         f"{section} frames: length - prompt must be a positive multiple of {section}")
    return list(range(prompt, length, section))


def section_order(order: str, n_sections: int) -> list[int]:
    """The sections (0 = first after the prompt) in the order `order` generates them."""
    if order == "causal":
        return list(range(n_sections))
    if order == "bidirectional":
        return [0] + ([n_sections - 1] if n_sections > 1 else []) + list(range(1, n_sections - 1))
    if order == "inverted":
        return list(range(n_sections - 1, -1, -1))
    raise ValueError(f"unknown sampling order {order!r}; allowed: {ORDERS}")


def gather_context(video_BLHW: torch.Tensor, known: list[bool], start: int, model: FramePack) -> Context:
    """The context of the section at `start`: the anchor (frame 0) and the known frames on each side, nearest first,
    as many as the schedule packs; times relative to `start`."""
    cfg = model.cfg
    end, cap = start + cfg.section, cfg.max_side_frames
    past = [t for t in range(start - 1, 0, -1) if known[t]][:cap]
    future = [t for t in range(end, len(known)) if known[t]][:cap]
    rel = lambda ts: [t - start for t in ts]  # noqa: E731  (clipped to +-max_offset by the model)
    return Context(video_BLHW[:, 0], -start, video_BLHW[:, past], rel(past), video_BLHW[:, future], rel(future))


def draw_known(gen: torch.Generator, length: int, prompt: int, section: int, modes: list[str]) -> tuple[int, list[bool]]:
    """A section start and the known frames of a training clip, as one step of an order in `modes` would see them."""
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=gen))]  # noqa: E731
    start = pick(section_starts(length, prompt, section))
    end = start + section
    mode = pick(modes)
    known = [t < start for t in range(length)]
    if mode == "bidirectional":
        if torch.rand(1, generator=gen).item() < 0.5:  # first the end of the video, from the prompt alone
            known = [t < prompt for t in range(length)]
        elif end < length:  # then a section between, with a later section generated (the causal case when none is left)
            e = pick(range(end, length - section + 1, section))
            known = [t < start or e <= t < e + section for t in range(length)]
    elif mode == "inverted":
        known = [t < prompt or t >= end for t in range(length)]
    return start, known


@dataclass
class Rollout:
    video_BLHW: torch.Tensor
    context_tokens: list[int]   # conditioning tokens of each generated section, in generation order
    seconds: float              # wall time of the whole rollout


@torch.no_grad()
def rollout(model: FramePack, prompt_BPHW: torch.Tensor, length: int, order: str, seed: int = 0) -> Rollout:
    """Generate `length` frames from the prompt in `order` (`seed`: the noise of a flow head)."""
    B, P, H, W = prompt_BPHW.shape
    S = model.cfg.section
    starts = section_starts(length, P, S)
    video = prompt_BPHW.new_zeros(B, length, H, W)
    video[:, :P] = prompt_BPHW
    known = [t < P for t in range(length)]
    tokens, t0, gen = [], time.perf_counter(), torch.Generator().manual_seed(seed)
    for k in section_order(order, len(starts)):
        s = starts[k]
        ctx = gather_context(video, known, s, model)
        tokens.append(model.cfg.context_tokens(len(ctx.past_t), len(ctx.future_t)))
        video[:, s:s + S] = model.predict(ctx, gen)
        known[s:s + S] = [True] * S
    return Rollout(video, tokens, time.perf_counter() - t0)
