"""PNG plots of a run: loss curves and expert-load heatmaps (matplotlib, no display)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def loss_curve(metrics: list[dict], out: Path, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(m["step"], m["train_loss"]) for m in metrics if "train_loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def heatmap(rows: list[list[float]], row_labels: list[str], xlabel: str, out: Path, title: str, cbar: str) -> None:
    """A rows x columns heatmap, e.g. layers x experts (load share) or domains x experts."""
    fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(rows[0]) + 2), 0.5 * len(rows) + 1.6))
    im = ax.imshow(rows, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(rows)), row_labels)
    ax.set(xlabel=xlabel, title=title)
    fig.colorbar(im, ax=ax, label=cbar)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
