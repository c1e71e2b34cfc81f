"""Accuracy-vs-MACs and accuracy-vs-measured-speedup plots for papers, rebuilt from records only.

One panel per (dataset, model). One colour per method family (`runs.FAMILIES`), one line
style per method within it; hollow markers are masked runs (their MACs are theoretical:
zeros skipped on paper), filled ones are compacted or smaller dense models (real MACs).
Error bars: 95 % t-intervals over seeds; on the speedup axis, the seed interval or, with one
seed, the run's bootstrap interval of the measured speedup. The dense reference is a black
star and a dotted line. The Pareto front is a grey step line whose points are labelled by
their method. The y axis starts at a floor below the front's weakest point; runs under it
are named in the panel, not silently cut.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sparsebench.report.runs import FAMILIES, display_method, family_of  # noqa: E402

FAMILY_COLORS = {"dense / baselines": "#555555", "magnitude": "#1f77b4", "dynamic sparse": "#d62728",
                 "ViT methods": "#9467bd", "channel": "#2ca02c", "other": "#ff7f0e"}
LINESTYLES = ["-", "--", ":", "-."]
FLOOR_MARGIN = 10.0          # accuracy points kept below the weakest Pareto point


def pareto_front(x: np.ndarray, y: np.ndarray, larger_x_better: bool) -> np.ndarray:
    """Indices of points no other point beats on both axes, sorted by x (ties: best y wins)."""
    order = np.lexsort((-y, -x if larger_x_better else x))
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return np.array(sorted(front, key=lambda i: x[i]), dtype=int)


def _normalise(agg: pd.DataFrame) -> pd.DataFrame:
    """The columns the plot reads, from `runs.summarize` or from the leaderboard's `aggregate`."""
    df = agg.copy()
    if "status" in df:
        df = df[df["status"] == "ok"]
    if df.empty:
        return df
    if "family" not in df:
        df["family"] = df["method"].map(family_of)
    if "masked" not in df:
        df["masked"] = df["granularity"].isin(["unstructured", "n:m"])
    ci = df["measured_speedup_ci"].astype(float).fillna(0) if "measured_speedup_ci" in df else 0.0
    if "speedup_lo" not in df:
        df["speedup_lo"] = df["measured_speedup"].astype(float) - ci
        df["speedup_hi"] = df["measured_speedup"].astype(float) + ci
    df["realizable"] = df["realizable"].fillna(False).astype(bool)
    return df


def _method_styles(methods: Sequence[str]) -> Dict[str, dict]:
    styles, seen = {}, {}
    for m in sorted(methods):
        fam = family_of(m)
        k = seen.get(fam, 0)
        seen[fam] = k + 1
        styles[m] = {"color": FAMILY_COLORS.get(fam, FAMILY_COLORS["other"]), "ls": LINESTYLES[k % len(LINESTYLES)],
                     "family": fam}
    return styles


def _short(method: str) -> str:
    """A label that fits a panel; `†` marks runs that pruned the input layer and classifier too."""
    return display_method(method).replace(" †", "†").replace("magnitude-", "mag-").replace(
        "[distribution=erk]", "-erk")


def plot(agg: pd.DataFrame, path: Path, x: str = "macs", formats: Sequence[str] = ()) -> Path:
    """x = 'macs' (MACs remaining per image) or 'speedup' (measured, realizable runs only).
    Writes `path` (its suffix decides the format) and the same figure in each of `formats`."""
    if x not in ("macs", "speedup"):
        raise ValueError(f"unknown x axis {x!r}; allowed: macs, speedup")
    df = _normalise(agg) if not agg.empty else agg
    panels = list(df.groupby(["dataset", "model"], sort=True)) if not df.empty else []
    cols = max(1, min(2, len(panels)))
    rows = max(1, int(np.ceil(len(panels) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(max(7.5, 6.0 * cols), 5.2 * rows), squeeze=False)
    styles = _method_styles(df["method"].unique()) if not df.empty else {}
    if not panels:
        ax = axes[0, 0]
        ax.text(0.5, 0.5, "nothing to draw:\nno runs with a result (status ok) in these records",
                ha="center", va="center", fontsize=11, transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    used: Dict[str, dict] = {}
    markers_used = set()
    for ax, ((dataset, model), part) in zip(axes.flat, panels):
        _panel(ax, part, x, styles, used, markers_used)
        ax.set_title(f"{model} on {dataset}" + (f"  ·  {part['device'].iloc[0]}" if x == "speedup" else ""),
                     fontsize=10)
    for ax in list(axes.flat)[max(1, len(panels)):]:
        ax.axis("off")
    handles = _legend_handles(used, markers_used, x)
    if handles:
        ncol = 4 if cols > 1 else 3
        for h in handles:      # long method labels (several arguments) wrap at commas instead of leaving the figure
            h.set_label(_wrap(h.get_label()))
        fig.tight_layout()
        # the legend goes under everything the panels drew (tick labels, axis labels, the "not shown"
        # notes under each axis), however long those are; the saved figure grows to hold it
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        to_figure = fig.transFigure.inverted()
        lowest = min(ax.get_tightbbox(renderer).transformed(to_figure).y0 for ax in axes.flat if ax.axison)
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, lowest - 0.01), ncol=ncol,
                   fontsize=8 if len(handles) <= 24 else 7, frameon=False)
    else:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight", pad_inches=0.1)    # the legend is never clipped
    for fmt in formats:
        if path.with_suffix("." + fmt) != path:
            # no date and fixed element ids: the same records give the same file (clean diffs)
            with matplotlib.rc_context({"svg.hashsalt": "sparsebench"}):
                fig.savefig(path.with_suffix("." + fmt), metadata={"Date": None}, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return path


def _panel(ax, part: pd.DataFrame, x: str, styles, used, markers_used) -> None:
    dense = part[part["target_kind"] == "none"]
    runs = part[part["target_kind"] != "none"]
    if x == "speedup":
        runs = runs[runs["realizable"] & runs["measured_speedup"].notna()]
    xlabel = "MACs per image (millions; log scale)" if x == "macs" else "measured speedup (×, throughput batch)"
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("test top-1 (%)", fontsize=9)
    ax.grid(alpha=0.3)
    dense_y = float(dense["top1"].iloc[0]) if not dense.empty else None
    if runs.empty:
        why = ("no realizable runs: no run here has a measured speedup on this device"
               if x == "speedup" else "no pruned runs with a result")
        ax.text(0.5, 0.5, "nothing to draw\n" + "\n".join(textwrap.wrap(why, 40)), ha="center", va="center",
                fontsize=9, transform=ax.transAxes, color="#444")
        if dense_y is not None:
            ax.axhline(dense_y, color="black", lw=0.8, ls=":")
        return
    xs, ys, names = [], [], []
    for method, line in runs.groupby("method", sort=True):
        st = styles[method]
        used[method] = st
        line = line.assign(_x=(line["macs"].astype(float) / 1e6) if x == "macs" else line["measured_speedup"].astype(float))
        line = line.sort_values("_x")
        xv, yv = line["_x"].to_numpy(), line["top1"].astype(float).to_numpy()
        yerr = line["top1_ci"].astype(float).fillna(0).to_numpy()
        xerr = None
        if x == "speedup":
            lo = (xv - line["speedup_lo"].astype(float).fillna(pd.Series(xv, index=line.index)).to_numpy()).clip(0)
            hi = (line["speedup_hi"].astype(float).fillna(pd.Series(xv, index=line.index)).to_numpy() - xv).clip(0)
            xerr = np.vstack([lo, hi])
        ax.plot(xv, yv, color=st["color"], ls=st["ls"], lw=1.3, zorder=2)
        for masked, sub in ((True, line["masked"].to_numpy()), (False, ~line["masked"].to_numpy())):
            if not sub.any():
                continue
            markers_used.add(masked)
            ax.errorbar(xv[sub], yv[sub], yerr=yerr[sub], xerr=None if xerr is None else xerr[:, sub],
                        fmt="o" if masked else "s", ms=5.5, capsize=2.5, elinewidth=0.9, color=st["color"],
                        mfc="white" if masked else st["color"], mec=st["color"], zorder=3)
        xs += list(xv)
        ys += list(yv)
        names += [f"{method} {t}" for t in line["target_label"]] if "target_label" in line else [method] * len(xv)
    xa, ya = np.array(xs), np.array(ys)
    front = pareto_front(xa, ya, larger_x_better=(x == "speedup"))
    if len(front) > 1:
        ax.step(xa[front], ya[front], where="post" if x == "macs" else "pre", color="grey", alpha=0.35, lw=4,
                zorder=1)
    for i in front:
        ax.annotate(_short(names[i].split(" ")[0]), (xa[i], ya[i]), xytext=(4, 5), textcoords="offset points",
                    fontsize=6.5, color="#333", zorder=4)
    if dense_y is not None:
        ax.axhline(dense_y, color="black", lw=0.8, ls=":", zorder=1)
        dense_x = float(dense["macs"].iloc[0]) / 1e6 if x == "macs" else 1.0
        ax.plot([dense_x], [dense_y], marker="*", ms=13, color="black", ls="none", zorder=5)
    # y floor: the useful band, from a margin below the front's weakest point up to the best
    top = max([*ya, dense_y or -np.inf])
    floor = max(ya[front].min() - FLOOR_MARGIN, ya.min() - 2)
    below = [(names[i], ya[i]) for i in np.argsort(ya) if ya[i] < floor]
    ax.set_ylim(floor, top + 0.08 * (top - floor) + 0.5)
    if below:
        listing = "; ".join(f"{_short(n)} ({v:.1f})" for n, v in below)
        # under the axis, never over a point
        ax.annotate("\n".join(textwrap.wrap(f"▼ below {floor:.1f} %, not shown: {listing}", 95)),
                    xy=(0, 0), xycoords="axes fraction", xytext=(0, -30), textcoords="offset points",
                    fontsize=6.5, va="top", ha="left", color="#8b0000")
    if x == "macs":
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    else:
        ax.axvline(1.0, color="black", lw=0.6, ls=":", zorder=1)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g×"))


def _legend_handles(used: Dict[str, dict], markers_used, x: str) -> List[Line2D]:
    handles = [Line2D([], [], color="black", marker="*", ms=11, ls=":", lw=0.8, label="dense reference")]
    order = list(FAMILIES) + ["other"]
    for method, st in sorted(used.items(), key=lambda kv: (order.index(kv[1]["family"]), kv[0])):
        handles.append(Line2D([], [], color=st["color"], ls=st["ls"], marker=None, label=_short(method)))
    if True in markers_used:
        label = "masked (theoretical MACs)" if x == "macs" else "masked"
        handles.append(Line2D([], [], color="grey", marker="o", mfc="white", ls="none", label=label))
    if False in markers_used:
        label = "compacted (real MACs)" if x == "macs" else "compacted"
        handles.append(Line2D([], [], color="grey", marker="s", ls="none", label=label))
    handles.append(Line2D([], [], color="grey", alpha=0.35, lw=4, label="Pareto front (labelled)"))
    if any("†" in _short(m) for m in used):
        handles.append(Line2D([], [], ls="none", label="† input layer and classifier pruned too"))
    return handles


def _wrap(label: str, width: int = 42) -> str:
    """Break a long legend label after commas (method arguments), at most `width` characters a line."""
    if len(label) <= width:
        return label
    lines, line = [], ""
    for part in label.split(","):
        piece = part if not line else "," + part
        if line and len(line) + len(piece) > width:
            lines.append(line + ",")
            line = part
        else:
            line += piece
    return "\n".join(lines + [line])


def family_legend() -> Dict[str, Optional[str]]:
    """Family → colour, for the site's key."""
    return dict(FAMILY_COLORS)
