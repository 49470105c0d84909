"""The report's figures (matplotlib, Agg backend), each written atomically as a PNG file under
``OUT/plots/``. Inputs are numpy arrays already reduced (histogram counts, per-class quantiles): a
figure never holds a Python object per row."""

from __future__ import annotations

import io
import os

import numpy as np

from ..errors import ConfigError
from ..tables import atomic_write_bytes

PLOT_DIR = "plots"
SMALL_MULTIPLES = 12  # up to this many classes: one histogram per class; above: per-class quantile bands


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("dataprune report draws its plots with matplotlib: pip install 'dataprune[plot]'") from None
    return plt


def _save(fig, out: str, name: str) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    os.makedirs(os.path.join(out, PLOT_DIR), exist_ok=True)
    rel = f"{PLOT_DIR}/{name}.png"
    atomic_write_bytes(os.path.join(out, rel), buf.getvalue())
    return rel


def histogram(out: str, name: str, metric: str, edges: np.ndarray, counts: np.ndarray) -> str:
    """The distribution of one metric over all scored rows."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    ax.stairs(counts, edges, fill=True, color="#4c72b0", alpha=0.85)
    ax.set_xlabel(f"{metric} (higher = harder)")
    ax.set_ylabel("rows")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out, name)


def class_histograms(out: str, name: str, metric: str, edges: np.ndarray, counts: np.ndarray, names: list[str]) -> str:
    """One small histogram per class (``counts``: classes × bins), sharing the x axis."""
    plt = _plt()
    k = len(names)
    cols = min(4, k)
    rows = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.6 * rows + 0.3), sharex=True, squeeze=False)
    for j, ax in enumerate(axes.flat):
        if j >= k:
            ax.axis("off")
            continue
        ax.stairs(counts[j], edges, fill=True, color="#55a868", alpha=0.85)
        ax.set_title(names[j][:28], fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{metric} per class", fontsize=9)
    fig.tight_layout()
    return _save(fig, out, name)


def class_bands(out: str, name: str, metric: str, q: np.ndarray, names: list[str]) -> str:
    """Per-class quantiles (``q``: classes × 5 = 5, 25, 50, 75, 95 %), classes sorted by median."""
    plt = _plt()
    order = np.argsort(q[:, 2], kind="stable")
    x = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    ax.fill_between(x, q[order, 0], q[order, 4], color="#c44e52", alpha=0.15, label="5–95 %", step="mid")
    ax.fill_between(x, q[order, 1], q[order, 3], color="#c44e52", alpha=0.35, label="25–75 %", step="mid")
    ax.plot(x, q[order, 2], color="#c44e52", lw=1, label="median")
    ax.set_xlabel(f"classes, sorted by median {metric} ({len(order)})")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out, name)


def correlations(out: str, name: str, metrics: list[str], rho: np.ndarray) -> str:
    """Spearman rank correlations between metrics as a heat map with the values written in."""
    plt = _plt()
    k = len(metrics)
    fig, ax = plt.subplots(figsize=(1.1 * k + 2, 0.9 * k + 1.2))
    im = ax.imshow(rho, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(k), metrics, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(k), metrics, fontsize=8)
    for a in range(k):
        for b in range(k):
            ax.text(b, a, "—" if np.isnan(rho[a, b]) else f"{rho[a, b]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return _save(fig, out, name)


def kept_per_class(out: str, name: str, kept: np.ndarray, dropped: np.ndarray, names: list[str]) -> str:
    """Kept and dropped rows per class as stacked bars (at most a few hundred classes are labelled)."""
    plt = _plt()
    x = np.arange(len(kept))
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    if len(x) > 50:  # one filled outline per series, not one patch per bar
        ax.stairs(kept + dropped, np.arange(len(x) + 1) - 0.5, fill=True, color="#dd8452", label="dropped")
        ax.stairs(kept, np.arange(len(x) + 1) - 0.5, fill=True, color="#4c72b0", label="kept")
    else:
        ax.bar(x, kept, color="#4c72b0", label="kept", width=0.8)
        ax.bar(x, dropped, bottom=kept, color="#dd8452", label="dropped", width=0.8)
    if len(x) <= 30:
        ax.set_xticks(x, [n[:12] for n in names], rotation=45, ha="right", fontsize=7)
    else:
        ax.set_xlabel(f"class ({len(x)})")
    ax.set_ylabel("rows")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, name)


def curve(out: str, name: str, series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> str:
    """Test error vs fraction kept, one line per strategy (mean ± std over repeats)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    fracs: set[float] = set()
    for strategy, (fr, mean, std) in series.items():
        ax.errorbar(fr, mean * 100, yerr=std * 100 if np.any(std > 0) else None, marker="o", capsize=3, label=strategy)
        fracs.update(float(f) for f in fr)
    ax.set_xscale("log")
    ticks = sorted(f for f in fracs if f > 0)
    if ticks:
        ax.set_xticks(ticks, [f"{f:g}" for f in ticks])
    ax.invert_xaxis()
    ax.set_xlabel("fraction of data kept")
    ax.set_ylabel("test error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out, name)
