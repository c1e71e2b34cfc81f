"""A compact view of the speedup table (measure/speedup.py) for the README and reports."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd


def speedup_summary(csv: Path) -> str:
    """One row per (model, FLOPs target): theoretical vs measured speedup per (threads, batch)."""
    table = pd.read_csv(csv)
    table["setting"] = table.apply(lambda r: f"measured, {r.threads} thr, batch {r.batch}", axis=1)
    measured = table.pivot_table(index=["model", "target_flops"], columns="setting", values="measured_speedup",
                                 sort=False)
    theoretical = table.groupby(["model", "target_flops"], sort=False)["theoretical_speedup"].first()
    out = pd.concat([theoretical.rename("theoretical"), measured], axis=1).reset_index()
    order = {m: i for i, m in enumerate(dict.fromkeys(table["model"]))}
    out = out.sort_values(["model", "target_flops"], key=lambda c: c.map(order) if c.name == "model" else -c)
    out = out.rename(columns={"target_flops": "FLOPs kept"})
    return out.to_markdown(index=False, floatfmt=".2f")


def entries_frame(records) -> pd.DataFrame:
    """One row per measured latency entry of the records (`RunRecord.latency_entries`), beside the
    run's theoretical speedup: what `plot_measured_vs_theoretical` draws for a results directory."""
    rows = []
    for r in records:
        for e in r.latency_entries():
            if e["status"] == "measured":
                rows.append({"model": r.model, "method": r.method, "theoretical_speedup": r.theoretical_speedup,
                             **{k: e[k] for k in ("device", "runtime", "realization", "batch", "measured_speedup")}})
    return pd.DataFrame(rows)


RUNTIME_MARKERS = {"eager": "o", "compile": "s", "onnxruntime": "^"}
REALIZATION_COLOURS = {"auto": "tab:blue", "csr": "tab:orange", "2:4": "tab:purple", "compacted": "tab:green",
                       "dense": "tab:gray"}


def plot_measured_vs_theoretical(table: pd.DataFrame, path: Path, title: str = "") -> Optional[Path]:
    """Measured against theoretical speedup, one panel per batch size, colour per realization,
    marker per runtime, with the line where measured equals theoretical and the line of no speedup.
    `table`: rows with theoretical_speedup, measured_speedup, realization, runtime, batch (the
    `speedup` command's CSV or `entries_frame`). None where nothing was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    needed = ["measured_speedup", "theoretical_speedup", "realization", "batch"]
    if table.empty or any(c not in table for c in needed):      # nothing measured (latency off, no result)
        return None
    t = table.dropna(subset=["measured_speedup", "theoretical_speedup"])
    if t.empty:
        return None
    t = t.assign(runtime=t["runtime"].fillna("eager") if "runtime" in t else "eager")
    batches = sorted(t["batch"].dropna().astype(int).unique())
    fig, axes = plt.subplots(1, len(batches), figsize=(4.6 * len(batches), 4.2), squeeze=False, sharey=True)
    top = max(float(t["theoretical_speedup"].max()), float(t["measured_speedup"].max())) * 1.15
    for ax, batch in zip(axes[0], batches):
        part = t[t["batch"].astype(int) == batch]
        for (realization, runtime), g in part.groupby(["realization", "runtime"], sort=True):
            ax.scatter(g["theoretical_speedup"], g["measured_speedup"], s=34, alpha=0.85,
                       color=REALIZATION_COLOURS.get(realization, "black"), marker=RUNTIME_MARKERS.get(runtime, "x"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.plot([1, top], [1, top], color="0.6", lw=0.8, ls="--")
        ax.axhline(1.0, color="0.3", lw=0.8)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(FixedLocator([0.25, 0.5, 1, 2, 4, 8, 16, 32]))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
            axis.set_minor_formatter(NullFormatter())
        ax.set_xlim(0.9, top)
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.set_xlabel("theoretical speedup (dense MACs / realized MACs)")
        ax.grid(True, which="both", alpha=0.25)
    axes[0][0].set_ylabel("measured speedup (dense / realized latency)")
    handles = [Line2D([], [], ls="", marker="o", color=REALIZATION_COLOURS.get(k, "black"), label=k)
               for k in sorted(t["realization"].dropna().unique())]
    handles += [Line2D([], [], ls="", marker=RUNTIME_MARKERS.get(k, "x"), color="0.3", label=k)
                for k in sorted(t["runtime"].unique())]
    handles += [Line2D([], [], color="0.6", ls="--", label="measured = theoretical"),
                Line2D([], [], color="0.3", label="no speedup")]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def unstructured_summary(csv: Path) -> str:
    """The unstructured rows of a speedup table (magnitude masks per realization): one row per (model,
    sparsity, realization), theoretical speedup, then the measured speedup per (runtime, batch), "n/s"
    where the runtime cannot run the realization (its reason in the CSV); then each runtime's dense
    latency per batch, so a speedup can be read against the fastest dense runtime too."""
    table = pd.read_csv(csv)
    table = table[table["target_sparsity"].notna()].copy()
    table["runtime"] = table["runtime"].fillna("eager") if "runtime" in table else "eager"
    runtimes = list(dict.fromkeys(table["runtime"]))
    table["setting"] = table.apply(lambda r: f"{r.runtime}, batch {int(r.batch)}", axis=1)
    table["shown"] = table.apply(lambda r: f"{r.measured_speedup:.2f}×" if r.status == "measured" else
                                 ("n/s" if str(r.status).startswith("not supported") else "–"), axis=1)
    order = [f"{rt}, batch {b}" for b in sorted(table["batch"].astype(int).unique()) for rt in runtimes]
    keys = ["model", "target_sparsity", "realization"]
    measured = table.pivot_table(index=keys, columns="setting", values="shown", aggfunc="first", sort=False)
    measured = measured[[c for c in order if c in measured.columns]]
    theoretical = table.groupby(keys, sort=False)["theoretical_speedup"].first().map(lambda v: f"{v:.2f}×")
    out = pd.concat([theoretical.rename("theoretical"), measured], axis=1).reset_index()
    out = out.rename(columns={"target_sparsity": "sparsity"})
    dense = table[table["status"] == "measured"].groupby(["model", "runtime", "batch"], sort=False)["dense_ms"] \
        .median().unstack("runtime")
    dense = dense[[r for r in runtimes if r in dense.columns]].reset_index()
    dense.columns = ["model", "batch"] + [f"dense ms, {r}" for r in dense.columns[2:]]
    return (out.to_markdown(index=False, floatfmt=".2f") + "\n\nDense latency per runtime (ms, median over the "
            "rows above):\n\n" + dense.to_markdown(index=False, floatfmt=".1f"))
