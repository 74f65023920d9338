"""Bouncing shapes: small grayscale videos with ground truth for any length.

One to `max_shapes` shapes (disc, square, diamond) of random size move with random
constant speed and bounce off the walls; a shape's centre stays in [r, size - r], so
no part of it ever leaves the frame. Frames are binary (a pixel is on when its centre
lies inside a shape). Everything is drawn from a torch.Generator, so a seed fixes a
video, and a longer simulation of the same seed starts with the shorter one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moe_playground.models.validate import check

SHAPES = ("disc", "square", "diamond")


@dataclass
class SimConfig:
    min_shapes: int = 1
    max_shapes: int = 3
    min_radius: float = 3.0
    max_radius: float = 5.0
    min_speed: float = 0.5      # pixels per frame
    max_speed: float = 2.0
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))

    def __post_init__(self) -> None:
        check(1 <= self.min_shapes <= self.max_shapes,
              f"data.min_shapes={self.min_shapes} must be >= 1 and <= data.max_shapes={self.max_shapes}")
        check(1.0 <= self.min_radius <= self.max_radius,
              f"data.min_radius={self.min_radius} must be >= 1 and <= data.max_radius={self.max_radius}")
        check(0 <= self.min_speed <= self.max_speed,
              f"data.min_speed={self.min_speed} must be >= 0 and <= data.max_speed={self.max_speed}")
        check(len(self.shapes) >= 1 and all(s in SHAPES for s in self.shapes),
              f"data.shapes={self.shapes} must be a non-empty list drawn from {SHAPES}")

    def check_frame(self, size: int) -> None:
        """ValueError unless shapes fit and cannot jump past a wall in one frame."""
        check(2 * self.max_radius + 2 * self.max_speed < size,
              f"data.max_radius={self.max_radius} and data.max_speed={self.max_speed} are too large for "
              f"{size}-pixel frames: need 2 * max_radius + 2 * max_speed < {size}")


@dataclass
class Videos:
    frames_BLHW: torch.Tensor   # float 0/1
    centers_BLK2: torch.Tensor  # (x, y) in pixels of every shape slot
    present_BK: torch.Tensor    # which slots hold a shape


def _draw(cfg: SimConfig, size: int, gen: torch.Generator, B: int) -> tuple[torch.Tensor, ...]:
    K = cfg.max_shapes
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    n = torch.randint(cfg.min_shapes, cfg.max_shapes + 1, (B, 1), generator=gen)
    present = torch.arange(K)[None] < n
    radius = cfg.min_radius + (cfg.max_radius - cfg.min_radius) * u(B, K)
    kind = torch.tensor([SHAPES.index(s) for s in cfg.shapes])[torch.randint(len(cfg.shapes), (B, K), generator=gen)]
    pos = radius[..., None] + (size - 2 * radius[..., None]) * u(B, K, 2)
    speed = cfg.min_speed + (cfg.max_speed - cfg.min_speed) * u(B, K)
    angle = 2 * torch.pi * u(B, K)
    vel = torch.stack([angle.cos(), angle.sin()], dim=-1) * speed[..., None]
    return present, radius, kind, pos, vel


def render(centers_BK2: torch.Tensor, radius_BK: torch.Tensor, kind_BK: torch.Tensor, present_BK: torch.Tensor,
           size: int, pad: int = 0) -> torch.Tensor:
    """(B, size + 2 pad, size + 2 pad) binary frames; `pad` extends the canvas around the frame (for tests)."""
    c = torch.arange(-pad, size + pad, dtype=torch.float32) + 0.5
    dx = (c[None, None, None, :] - centers_BK2[..., 0, None, None]).abs()  # (B, K, 1, W)
    dy = (c[None, None, :, None] - centers_BK2[..., 1, None, None]).abs()  # (B, K, H, 1)
    r = radius_BK[..., None, None]
    inside = torch.stack([dx ** 2 + dy ** 2 <= r ** 2,                      # disc
                          (dx <= 0.85 * r) & (dy <= 0.85 * r),              # square of about the disc's area
                          dx + dy <= r], dim=2)                               # diamond
    on = inside.gather(2, kind_BK[:, :, None, None, None].expand(-1, -1, 1, *inside.shape[-2:])).squeeze(2)
    return (on & present_BK[..., None, None]).any(dim=1).float()


def simulate(cfg: SimConfig, size: int, n_frames: int, gen: torch.Generator, batch: int) -> Videos:
    """`batch` videos of `n_frames` frames drawn from `gen`."""
    cfg.check_frame(size)
    present, radius, kind, pos, vel = _draw(cfg, size, gen, batch)
    frames, centers = [], []
    lo, hi = radius[..., None], size - radius[..., None]
    for _ in range(n_frames):
        frames.append(render(pos, radius, kind, present, size))
        centers.append(pos)
        pos = pos + vel
        below, above = pos < lo, pos > hi  # reflect off the walls (one bounce per frame suffices: check_frame)
        pos = torch.where(below, 2 * lo - pos, torch.where(above, 2 * hi - pos, pos))
        vel = torch.where(below | above, -vel, vel)
    return Videos(torch.stack(frames, 1), torch.stack(centers, 1), present)


def videos_for_seeds(cfg: SimConfig, size: int, n_frames: int, seeds: list[int]) -> Videos:
    """One video per seed, each from its own generator: the same seed gives the same video in any batch."""
    vids = [simulate(cfg, size, n_frames, torch.Generator().manual_seed(s), 1) for s in seeds]
    return Videos(*(torch.cat([getattr(v, f) for v in vids]) for f in ("frames_BLHW", "centers_BLK2", "present_BK")))
