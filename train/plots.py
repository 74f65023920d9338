"""PNG plots of a run: loss curves and expert-load heatmaps (matplotlib, no display)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def loss_curve(metrics: list[dict], out: Path, title: str = "", ylabel: str = "loss (nats/token)") -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(m["step"], m["train_loss"]) for m in metrics if "train_loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="step", ylabel=ylabel, title=title)
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


def band_curves(curves: dict[str, tuple[list[int], list[float], list[float]]], out: Path, title: str, ylabel: str,
                xlabel: str = "step") -> None:
    """One line per name (x, mean, std) with a ± std band, e.g. validation loss of every sweep variant."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, (x, mean, std) in curves.items():
        (line,) = ax.plot(x, mean, "o-", ms=3, label=name)
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    finals = [mean[-1] for _, mean, _ in curves.values()]
    spread = max(finals) - min(finals)
    # zoom on the end of training, where the variants differ; the first evals run off the top
    ax.set_ylim(min(finals) - 0.3 * spread - 0.02, min(finals) + max(0.5, 4 * spread))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def bar_chart(names: list[str], means: list[float], stds: list[float], out: Path, title: str, ylabel: str) -> None:
    """Bars with ± std error bars, the y axis zoomed to the range of the bars."""
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(names) + 1.5), 3.6))
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(names)), names, rotation=25 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center",
                  fontsize=8)
    lo, hi = min(m - s for m, s in zip(means, stds)), max(m + s for m, s in zip(means, stds))
    ax.set_ylim(lo - 0.3 * (hi - lo) - 1e-3, hi + 0.1 * (hi - lo) + 1e-3)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def intervals(labels: list[str], means: list[float], los: list[float], his: list[float], out: Path, title: str,
              xlabel: str) -> None:
    """One row per label: the mean as a dot and its interval as a bar, with a line at 0."""
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.4))
    y = list(range(len(labels)))[::-1]
    ax.errorbar(means, y, xerr=[[m - lo for m, lo in zip(means, los)], [hi - m for m, hi in zip(means, his)]],
                fmt="o", capsize=4, color="tab:blue")
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set(xlabel=xlabel, title=title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
