"""Per-frame measures of generated videos, the drift measure, and PNG strips of rollouts.

Against the truth: mean squared error, and the object-centroid error (each true shape's
distance to the nearest predicted object, capped at half the frame). Reference-free:
sharpness (mean squared difference of neighbouring pixels; blur lowers it), binarity
(the share of lit pixels that are clearly on rather than grey) and the number of
connected objects (compared with the true frame's count). Drift, as FramePack reports
it: |mean of a measure over the first 15% of generated frames - over the last 15%|.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ON = 0.5               # a pixel belongs to an object above this
GREY = (0.15, 0.85)    # a lit pixel (> GREY[0]) is grey below GREY[1]
MIN_OBJECT_PIXELS = 3  # smaller connected specks are not counted as objects
DRIFT_SHARE = 0.15     # the first and last share of generated frames the drift measure compares


def components(mask_NHW: torch.Tensor) -> torch.Tensor:
    """(N, H*W + 1, 3): per frame and label, (pixel count, sum of x, sum of y) of 8-connected components of the mask;
    label 0 is the background. A component's label is the largest flat index + 1 of its pixels."""
    N, H, W = mask_NHW.shape
    m = mask_NHW.float()
    labels = torch.arange(1, H * W + 1, dtype=torch.float32).view(1, H, W) * m
    while True:  # spread the largest label through each component
        nxt = F.max_pool2d(labels[:, None], 3, 1, 1)[:, 0] * m
        if torch.equal(nxt, labels):
            break
        labels = nxt
    idx = labels.long().flatten(1)  # (N, H*W)
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    vals = torch.stack([torch.ones(H * W), xs.flatten(), ys.flatten()], dim=-1).expand(N, -1, -1)
    out = torch.zeros(N, H * W + 1, 3)
    return out.scatter_add_(1, idx[..., None].expand(-1, -1, 3), vals)


def object_stats(frames_NHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count (N,), centroids (N, H*W, 2), valid (N, H*W)) of the objects of each frame."""
    comp = components(frames_NHW > ON)[:, 1:]
    valid = comp[..., 0] >= MIN_OBJECT_PIXELS
    return valid.sum(-1), comp[..., 1:] / comp[..., :1].clamp(min=1), valid


def frame_measures(pred_BLHW: torch.Tensor, truth_BLHW: torch.Tensor, centers_BLK2: torch.Tensor,
                   present_BK: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every per-frame measure, each (B, L)."""
    B, L, H, W = pred_BLHW.shape
    n_pred, cent, valid = object_stats(pred_BLHW.flatten(0, 1))
    n_true = object_stats(truth_BLHW.flatten(0, 1))[0]
    d = torch.cdist(centers_BLK2.flatten(0, 1), cent)  # (BL, K, H*W): each true shape to each predicted object
    cap = H / 2
    nearest = d.masked_fill(~valid[:, None, :], float("inf")).amin(-1).clamp(max=cap)  # (BL, K)
    present = present_BK[:, None].expand(-1, L, -1).flatten(0, 1).float()
    lit = pred_BLHW > GREY[0]
    grey = lit & (pred_BLHW < GREY[1])
    return {
        "mse": ((pred_BLHW - truth_BLHW) ** 2).mean((-1, -2)),
        "centroid_err": ((nearest * present).sum(-1) / present.sum(-1)).view(B, L),
        "sharpness": sharpness(pred_BLHW),
        "binarity": 1 - grey.sum((-1, -2)) / lit.sum((-1, -2)).clamp(min=1),
        "count_err": (n_pred - n_true).abs().float().view(B, L),
    }


def sharpness(frames_BLHW: torch.Tensor) -> torch.Tensor:
    """(B, L) mean squared difference of horizontally and vertically neighbouring pixels."""
    dx = frames_BLHW.diff(dim=-1) ** 2
    dy = frames_BLHW.diff(dim=-2) ** 2
    return (dx.sum((-1, -2)) + dy.sum((-1, -2))) / frames_BLHW[0, 0].numel()


def drift(values_BL: torch.Tensor, share: float = DRIFT_SHARE) -> torch.Tensor:
    """(B,) |mean over the first `share` of frames - mean over the last `share`| (at least one frame each)."""
    n = max(1, round(share * values_BL.shape[1]))
    return (values_BL[:, :n].mean(1) - values_BL[:, -n:].mean(1)).abs()


def save_strip(path: Path, rows: dict[str, torch.Tensor], title: str, max_columns: int = 16) -> None:
    """One PNG: for each video, one row per entry of `rows` ((B, L, H, W) each) showing every k-th frame."""
    first = next(iter(rows.values()))
    B, L, H, W = first.shape
    every = max(1, L // max_columns)
    cols = list(range(0, L, every))
    pad = 1
    blocks, labels = [], []
    for b in range(B):
        for name, video in rows.items():
            frames = [F.pad(video[b, t], (0, pad, 0, pad), value=0.5) for t in cols]
            blocks.append(torch.cat(frames, dim=1))
            labels.append(f"video {b}: {name}")
        blocks.append(torch.full((H // 2, blocks[-1].shape[1]), 1.0))  # gap between videos
        labels.append(None)
    image = torch.cat(blocks[:-1], dim=0).clamp(0, 1).numpy()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(cols) + 1.5), 0.55 * len(blocks) + 0.8))
    ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    y, ticks, names = 0, [], []
    for block, label in zip(blocks, labels):
        if label:
            ticks.append(y + H / 2)
            names.append(label)
        y += block.shape[0]
    ax.set_yticks(ticks, names, fontsize=7)
    ax.set_xticks([(H + pad) * i + W / 2 for i in range(len(cols))], [str(t) for t in cols], fontsize=6)
    ax.set(xlabel="frame", title=title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
