"""A compact view of the speedup table (measure/speedup.py) for the README and reports."""
from __future__ import annotations

from pathlib import Path

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
