"""Plots of a run (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_heatmaps(matrices: dict[str, list[list[float]]], rounds: list[int], path: str,
                  max_panels: int = 16) -> str:
    """One heat-map per layer of the pairwise normalised filter distance between records."""
    names = list(matrices)[:max_panels]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    shown = list(range(len(rounds)))[::max(1, len(rounds) // 6)]
    labels = [rounds[i] for i in shown]
    for ax, name in zip(axes.flat, names):
        im = ax.imshow(matrices[name], cmap="viridis", vmin=0, origin="upper")
        ax.set_title(name, fontsize=8)
        ax.set_xticks(shown, labels, fontsize=6)
        ax.set_yticks(shown, labels, fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("normalised filter distance F(row round, column round)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, list[float]], x: list[int], path: str, ylabel: str = "") -> str:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, ys in curves.items():
        ax.plot(x[:len(ys)], ys, marker="o", markersize=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
