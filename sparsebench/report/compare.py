"""Your records against a reference directory's (e.g. the committed results/quick): per
(dataset, model, method, target, seed), both top-1s and both measured speedups."""
from __future__ import annotations

from typing import Iterable

import pandas as pd

from sparsebench.report.runs import as_float, display_method, runs_frame
from sparsebench.store.record import RunRecord

KEYS = ["dataset", "model", "method_key", "target_label", "seed"]


def compare_frame(mine: Iterable[RunRecord], reference: Iterable[RunRecord]) -> pd.DataFrame:
    a, b = runs_frame(mine), runs_frame(reference)
    if a.empty or b.empty:
        return pd.DataFrame()
    # matched without the input-layer/classifier arguments: a reference recorded before today's
    # default (both dense) still lines up, and the row says that the two differ there
    for df in (a, b):
        df["method_key"] = df["method"].map(lambda m: display_method(m).replace(" †", ""))
    cols = KEYS + ["method", "status", "top1", "measured_speedup", "device"]
    both = a[cols].merge(b[cols], on=KEYS, how="inner", suffixes=("", "_ref"))
    both["delta_top1"] = both["top1"].astype(float) - both["top1_ref"].astype(float)
    return both


def compare_text(mine: Iterable[RunRecord], reference: Iterable[RunRecord], reference_name: str) -> str:
    both = compare_frame(mine, reference)
    if both.empty:
        return f"no runs in common with {reference_name} to compare"

    def speed(v) -> str:
        f = as_float(v)
        return "–" if f is None else f"{f:.2f}×"

    def pct(v) -> str:
        f = as_float(v)
        return "–" if f is None else f"{f:.2f}"

    rows = [{"model": r["model"], "method": r["method_key"] + ("" if r["method"] == r["method_ref"] else " ‡"),
             "target": r["target_label"], "seed": r["seed"],
             "top1 yours": pct(r["top1"]), "top1 ref": pct(r["top1_ref"]),
             "Δ": "–" if as_float(r["delta_top1"]) is None else f"{r['delta_top1']:+.2f}",
             "speedup yours": speed(r["measured_speedup"]), "speedup ref": speed(r["measured_speedup_ref"]),
             "status": r["status"] if r["status"] == r["status_ref"] else f"{r['status']} (ref {r['status_ref']})"}
            for _, r in both.iterrows()]
    table = pd.DataFrame(rows).to_markdown(index=False)
    delta = both["delta_top1"].dropna().abs()
    devices = sorted(set(both["device"])), sorted(set(both["device_ref"]))
    summary = (f"{len(both)} runs in common with {reference_name}; top-1 differs by a median of "
               f"{delta.median():.2f} points (largest {delta.max():.2f}); {int((delta <= 2).sum())} of {len(delta)} "
               f"within 2 points. Timing: yours on {', '.join(devices[0])}, reference on {', '.join(devices[1])}."
               if len(delta) else f"{len(both)} runs in common with {reference_name}; none with a result on both sides")
    if (both["method"] != both["method_ref"]).any():
        summary += ("\n‡ the reference run pruned the input layer and classifier too (skip_first=False, "
                    "skip_last=False); yours left them dense (today's default), so expect a difference there.")
    summary += ("\nSmall differences are expected: training runs in float32 on your CPU's kernels (another "
                "instruction set or thread count changes rounding and so the trained weights), and measured "
                "speedups depend on your CPU, its load and its cache sizes.")
    return "\n".join([f"## Against the reference {reference_name}", "", table, "", summary, ""])
