"""Accuracy-vs-FLOPs and accuracy-vs-measured-speedup plots, rebuilt from records only.

One panel per (dataset, model); one line per method through its targets, error bars are
95 % CIs over seeds; the dense reference is a star; the Pareto front over all methods is
drawn as a grey step line.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def pareto_front(x: np.ndarray, y: np.ndarray, larger_x_better: bool) -> np.ndarray:
    """Indices of points no other point beats on both axes, sorted by x."""
    order = np.argsort(-x if larger_x_better else x)
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return np.array(sorted(front, key=lambda i: x[i]))


def _panels(agg: pd.DataFrame):
    return list(agg.groupby(["dataset", "model"], sort=True))


def plot(agg: pd.DataFrame, path: Path, x: str = "macs") -> Path:
    """x = 'macs' (MACs remaining, millions) or 'speedup' (measured speedup, realizable runs only)."""
    if x not in ("macs", "speedup"):
        raise ValueError(f"unknown x axis {x!r}; allowed: macs, speedup")
    panels = _panels(agg)
    if not panels:
        raise ValueError("no records to plot")
    cols = min(3, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    methods: List[str] = sorted(agg["method"].unique())
    colors = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}
    for ax, ((dataset, model), part) in zip(axes.flat, panels):
        dense = part[part["target_kind"] == "none"]
        data = part if x == "macs" else part[part["realizable"]]
        xs_all, ys_all = [], []
        # Latencies of different devices are different curves, never one line.
        by_device = data["device"].nunique() > 1
        for (method, device), line in data.groupby(["method", "device"]):
            label = f"{method} ({device})" if by_device else method
            if x == "macs":
                xv = line["macs"].to_numpy() / 1e6
                xerr = None
            else:
                xv = line["measured_speedup"].to_numpy()
                xerr = line["measured_speedup_ci"].fillna(0).to_numpy()
            order = np.argsort(xv)
            yv = line["top1"].to_numpy()
            yerr = line["top1_ci"].fillna(0).to_numpy()
            is_dense = (line["target_kind"] == "none").all()
            ax.errorbar(xv[order], yv[order], yerr=yerr[order], xerr=None if xerr is None else xerr[order],
                        marker="*" if is_dense else "o", ms=11 if is_dense else 5, capsize=3,
                        color="black" if is_dense else colors[method], label=label,
                        linestyle="none" if is_dense else "-")
            xs_all += list(xv)
            ys_all += list(yv)
        if len(xs_all) > 1:
            xa, ya = np.array(xs_all), np.array(ys_all)
            front = pareto_front(xa, ya, larger_x_better=(x == "speedup"))
            ax.step(xa[front], ya[front], where="post" if x == "macs" else "pre", color="grey", alpha=0.4,
                    lw=3, zorder=0, label="Pareto front")
        if x == "macs" and not dense.empty:
            ax.axhline(dense["top1"].iloc[0], color="black", lw=0.8, ls=":")
        ax.set_title(f"{model} on {dataset}")
        ax.set_xlabel("MACs remaining (M, per image)" if x == "macs" else "measured speedup (×, throughput batch)")
        ax.set_ylabel("test top-1 (%)")
        if x == "macs":
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
               ncol=min(5, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * int(np.ceil(len(handles) / 5)), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
