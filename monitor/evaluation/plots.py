"""Figures for the evaluation report (matplotlib, drawn off-screen to PNG files)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'forewarn[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_series(path: Path, timestamps: np.ndarray, values: np.ndarray, scores: Mapping[str, np.ndarray],
                windows: Sequence[tuple[float, float]], title: str) -> None:
    """The series with its labelled windows shaded, and each detector's score below it."""
    plt = _pyplot()
    when = [datetime.fromtimestamp(t, tz=timezone.utc) for t in timestamps]
    fig, axes = plt.subplots(1 + len(scores), 1, figsize=(12, 2.2 * (1 + len(scores))), sharex=True)
    axes[0].plot(when, values, lw=0.6, color="black")
    axes[0].set_title(title)
    for ax, (name, s) in zip(axes[1:], scores.items()):
        ax.plot(when, s, lw=0.6)
        ax.set_ylabel(name, rotation=0, ha="right")
    for ax in axes:
        _shade(ax, windows)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_flags(path: Path, timestamps: np.ndarray, values: np.ndarray, flags: Mapping[str, np.ndarray],
               windows: Sequence[tuple[float, float]], title: str) -> None:
    """The series once per detector, its flagged readings marked, labelled windows shaded."""
    plt = _pyplot()
    when = np.array([datetime.fromtimestamp(t, tz=timezone.utc) for t in timestamps])
    fig, axes = plt.subplots(len(flags), 1, figsize=(12, 2.4 * len(flags)), sharex=True, squeeze=False)
    for ax, (name, flagged) in zip(axes[:, 0], flags.items()):
        ax.plot(when, values, lw=0.5, color="black")
        ax.scatter(when[flagged], values[flagged], s=14, color="tab:red", zorder=3)
        ax.set_title(f"{name}: {int(flagged.sum())} readings flagged", fontsize=9, loc="left")
        _shade(ax, windows)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_threshold_curves(path: Path, thresholds: Sequence[float],
                          panels: Mapping[str, Mapping[str, Sequence[float]]], marks: Mapping[str, float],
                          title: str, ylim: tuple[float, float] | None = None) -> None:
    """Scores against a fixed threshold (log axis), one panel per entry of ``panels`` (a curve per
    entry inside it), the thresholds in ``marks`` as labelled vertical lines on every panel."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False, sharey=True)
    for ax, (panel, curves) in zip(axes[0], panels.items()):
        for name, values in curves.items():
            ax.plot(thresholds, values, lw=1.2, label=name)
        for name, at in marks.items():
            ax.axvline(at, color="grey", ls=":", lw=1)
            ax.annotate(name, (at, 0.02), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                        color="grey", ha="right")
        ax.set_xscale("log")
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_xlabel("threshold")
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("score")
    axes[0, -1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shade(ax, windows: Sequence[tuple[float, float]]) -> None:
    for a, b in windows:
        ax.axvspan(datetime.fromtimestamp(a, tz=timezone.utc), datetime.fromtimestamp(b, tz=timezone.utc),
                   color="tab:red", alpha=0.15, lw=0)


def plot_pr_curves(path: Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, (precision, recall) in curves.items():
        ax.step(recall, precision, where="post", label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_adaptation(path: Path, ks: Sequence[int], curves: Mapping[str, Sequence[float]], title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    x = [max(k, 0.5) for k in ks]  # K=0 drawn at 0.5 on the log axis
    for name, mse in curves.items():
        ax.plot(x, mse, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xticks(x, [str(k) for k in ks])
    ax.set_xlabel("adaptation steps K")
    ax.set_ylabel("one-step query MSE (scaled units)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
