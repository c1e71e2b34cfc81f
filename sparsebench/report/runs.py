"""The report's view of run records: one flat row per run, one summary row per result.

Every field of `RunRecord` that the static site, the paper plots and the sweep comparison
read is read here, so a change of the record touches this file only.

`summarize` groups runs by (dataset, model, device, method, target, status): the runs that
`leaderboard.ranked` lets into the means (met their target, finite, and a mechanism that did
not fail to act) make the "ok" row, as in `leaderboard.aggregate`; runs that missed their
target, diverged or failed make rows of their own, and so do runs that met their target but
whose record shows their defining mechanism did not act (status "did_not_act"), so the site
can show and filter them without mixing them into the means.
"""
from __future__ import annotations

import json
import math
import shlex
from typing import Any, Dict, Iterable, List, Optional

import pandas as pd

from sparsebench.report.leaderboard import (
    _labels, as_float, ci95, control_label, mechanism_of, method_label, ranked, row_mechanism,
    signal_control_labels, speed_fields, with_baseline_differences, with_control_differences, with_family_holm,
    with_ranks, with_signal_differences,
)
from sparsebench.store.record import RunRecord

# Method families of the paper plots: one colour each.
FAMILIES = {
    "dense / baselines": ("dense", "random"),
    "magnitude": ("magnitude-global", "magnitude-layerwise"),
    "dynamic sparse": ("gmp", "rigl", "set", "gap"),
    "ViT methods": ("svite", "s2vite", "svite-plus", "ofb"),
    "channel": ("l1-channel", "random-channel", "pass", "dense-small"),
}


def family_of(method: str) -> str:
    """The family of a method label (`gap-2:4`, `magnitude-layerwise[distribution=erk]` included)."""
    name = method.split("[", 1)[0]
    for family, members in FAMILIES.items():
        if name in members or (name.startswith("gap-") and "gap" in members):
            return family
    return "other"


EDGE_ARGS = ("skip_first=False,skip_last=False", "skip_first=False", "skip_last=False")


def display_method(label: str) -> str:
    """A method label without the arguments that prune the input layer and classifier, marked
    `†` instead: older records (schema 1) pruned every conv/linear, today's default leaves
    those two dense, so the label would otherwise spell it out on every row."""
    name = label
    for arg in EDGE_ARGS:
        name = name.replace("," + arg, "").replace(arg + ",", "").replace(arg, "")
    name = name.replace("[]", "")
    return name + " †" if name != label else name


def run_row(r: RunRecord) -> Dict[str, Any]:
    """A run's numbers as the report shows them (percentages for accuracies)."""
    row = {
        "run_id": r.run_id, "dataset": r.dataset, "model": r.model, "device": r.device, "method": method_label(r),
        "method_name": r.method, "family": family_of(method_label(r)), "granularity": r.granularity,
        "starts_from": r.starts_from, "seed": r.seed, "target_kind": r.target_kind, "target": r.target_value,
        "target_label": "dense" if r.target_kind == "none" else r.target_label, "status": r.status,
        "error": r.error, "dense_top1": None if r.dense_test_top1 is None else 100 * r.dense_test_top1,
        "method_steps": r.cost.method_steps, "method_budget_steps": r.cost.method_budget_steps,
        "method_seconds": r.cost.method_wall_seconds, "finetune_steps": r.cost.finetune_steps,
        "finetune_seconds": r.cost.finetune_wall_seconds, "pretrain_steps": r.cost.dense_pretrain_steps,
        "pretrain_seconds": r.cost.dense_pretrain_wall_seconds,
        "top1": None, "top5": None, "sparsity": None, "flops": None, "params": None, "macs": None,
        "macs_dense": None, "macs_is": None, "theoretical_speedup": None, "measured_speedup": None,
        "speedup_lo": None, "speedup_hi": None, "realizable": None, "realization_kind": None, "realization_reason": None,
        "realization_label": None,
        "mechanism": mechanism_of(r), "mechanism_reason": None if r.mechanism is None else r.mechanism.reason,
        "control_of_row": control_label(r), "signal_controls_of_row": signal_control_labels(r),
        "per_sample": r.per_sample,
    }
    if r.has_result:
        row.update(
            top1=100 * r.test_top1, top5=None if r.test_top5 is None else 100 * r.test_top5,
            sparsity=r.achieved_sparsity, flops=r.achieved_flops_ratio, params=r.params.nonzero,
            macs=r.macs.effective, macs_dense=r.macs.dense, macs_is=r.macs.effective_is,
            theoretical_speedup=r.theoretical_speedup, realization_kind=r.realization.kind,
            realization_reason=r.realization.reason,
        )
        speed = speed_fields(r, r.device)
        lo_hi = speed["measured_speedup_ci95"] or (None, None)
        row.update(measured_speedup=speed["measured_speedup"], realizable=speed["realizable"],
                   realization_label=speed["realization"], speedup_lo=lo_hi[0], speedup_hi=lo_hi[1])
    return row


def runs_frame(records: Iterable[RunRecord]) -> pd.DataFrame:
    return pd.DataFrame([run_row(r) for r in records])


def _mean(v: pd.Series) -> float:
    v = pd.to_numeric(v, errors="coerce").dropna()
    return float(v.mean()) if len(v) else float("nan")


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, model, device, method, target, status): means over seeds, 95 %
    t-intervals (NaN with one seed), and the measured-speedup interval: the t-interval over
    seeds, or the record's bootstrap interval when there is one seed. `status` is the runs'
    standing: "ok" for the runs that enter the means (`leaderboard.ranked`), "did_not_act" for
    runs that met their target but whose mechanism did not act, else the record's status.
    Each row has the leaderboard's `mechanism` word and, for a seed-method "ok" row, its
    paired difference to its null control (the leaderboard's `control_*` columns) and to its signal
    control (`signal`, `signal_*`); "ok" rows carry
    the leaderboard's `rank` within their (dataset, model, device, target) table and, for a
    seed-method row, its paired difference to the strongest baseline (`baseline_*`), with Holm's
    adjustment over the Δ control, Δ signal and Δ baseline tests of their (dataset, model, device) table."""
    if runs.empty:
        return pd.DataFrame()
    entered = ranked(runs)
    runs = runs.assign(status=runs["status"].where(runs.index.isin(entered.index) | (runs["status"] != "ok"),
                                                   "did_not_act"))
    keys = ["dataset", "model", "device", "method", "family", "granularity", "target_kind", "target_label", "status"]
    rows = []
    for key, g in runs.groupby(keys, sort=False, dropna=False):
        row = dict(zip(keys, key))
        top1 = pd.to_numeric(g["top1"], errors="coerce")
        speed = pd.to_numeric(g["measured_speedup"], errors="coerce")
        row.update(
            target=g["target"].iloc[0], seeds=int(g["seed"].nunique()), run_ids=list(g["run_id"]),
            top1=_mean(top1), top1_ci=ci95(top1), top5=_mean(g["top5"]),
            top5_ci=ci95(pd.to_numeric(g["top5"], errors="coerce")),
            delta=_mean(top1 - g["dense_top1"]), dense_top1=_mean(g["dense_top1"]),
            sparsity=_mean(g["sparsity"]), flops=_mean(g["flops"]), params=_mean(g["params"]),
            macs=_mean(g["macs"]), macs_dense=_mean(g["macs_dense"]),
            theoretical_speedup=_mean(g["theoretical_speedup"]), measured_speedup=_mean(speed),
            measured_speedup_ci=ci95(speed),
            realizable=bool(g["realizable"].fillna(False).astype(bool).all()) if g["realizable"].notna().any() else None,
            realization=_labels(g["realization_label"]),
            masked=bool((g["macs_is"] == "theoretical").any() or g["granularity"].iloc[0] in ("unstructured", "n:m")),
            method_steps=_mean(g["method_steps"]), method_seconds=_mean(g["method_seconds"]),
            finetune_steps=_mean(g["finetune_steps"]), finetune_seconds=_mean(g["finetune_seconds"]),
            errors="; ".join(sorted({e for e in g["error"] if isinstance(e, str) and e})),   # NaN when mixed with None
            mechanism=row_mechanism(g["mechanism"]),
            mechanism_reasons="; ".join(sorted({m for m in g["mechanism_reason"] if isinstance(m, str) and m})),
        )
        if row["seeds"] >= 2 and not math.isnan(row["measured_speedup_ci"]):
            row["speedup_lo"] = row["measured_speedup"] - row["measured_speedup_ci"]
            row["speedup_hi"] = row["measured_speedup"] + row["measured_speedup_ci"]
        else:
            row["speedup_lo"], row["speedup_hi"] = _mean(g["speedup_lo"]), _mean(g["speedup_hi"])
        rows.append(row)
    entered = entered.assign(test_top1=entered["top1"])
    out = with_signal_differences(with_control_differences(pd.DataFrame(rows), entered, keys), entered, keys)
    setting, ok = ["dataset", "model", "device", "target_kind", "target_label"], out["status"] == "ok"
    out = with_baseline_differences(with_ranks(out, entered, setting, ok), entered, setting, ok)
    out = with_family_holm(out, ["dataset", "model", "device"], ok)
    kind = out["target_kind"].map({"none": 0, "sparsity": 1, "flops": 2}).fillna(3)
    status = out["status"].map({"ok": 0, "missed_target": 1, "diverged": 2, "failed": 3}).fillna(4)
    return (out.assign(_k=kind, _s=status, _t=out["target"].astype(float).fillna(-1))
               .sort_values(["dataset", "model", "device", "_k", "_t", "_s", "top1"],
                            ascending=[True, True, True, True, False, True, False], na_position="last")
               .drop(columns=["_k", "_s", "_t"]).reset_index(drop=True))


# --- one run ------------------------------------------------------------------------------------
def reproduce_command(r: RunRecord, out: str = "runs/") -> str:
    """The `sparsebench run` command whose spec is this record's spec: method arguments as
    recorded, and the recipe, data and measurement settings that differ from the defaults the
    command starts from (the model family's recipe, `DataSpec()`, `MeasureSpec()`)."""
    from sparsebench.models import FAMILY_RECIPES
    from sparsebench.specs import DataSpec, MeasureSpec, Recipe

    spec = r.spec
    defaults = _method_defaults(r.method)
    parts = ["sparsebench", "run", "--method", r.method, "--model", r.model, "--dataset", r.dataset,
             "--target", "none" if r.target_kind == "none" else r.target_label.replace(" ", ""), "--seed", str(r.seed)]
    for k, v in sorted((spec.get("method_args") or {}).items()):
        if k not in defaults or defaults[k] != v:      # defaults are filled back in when the run resolves
            parts += ["--method-arg", f"{k}={_scalar(v)}"]
    base_recipe = FAMILY_RECIPES.get(r.model_family, Recipe())
    for k, v in sorted((spec.get("recipe") or {}).items()):
        # compared as JSON: 15 and 15.0 hash differently, so the type must come through too
        if json.dumps(getattr(base_recipe, k, None)) != json.dumps(v):
            parts += ["--recipe", f"{k}={_scalar(v)}"]
    data = spec.get("data") or {}
    if data.get("img_size") is not None:
        parts += ["--img-size", str(data["img_size"])]
    if data.get("val_fraction", DataSpec().val_fraction) != DataSpec().val_fraction:
        parts += ["--val-fraction", _scalar(data["val_fraction"])]
    for k in ("split_seed", "workers"):
        if k in data and data[k] != getattr(DataSpec(), k):
            parts += ["--data", f"{k}={_scalar(data[k])}"]
    measure = spec.get("measure") or {}
    default = MeasureSpec()
    if measure.get("latency") is False:
        parts += ["--no-latency"]
    if measure.get("threads", default.threads) != 1:
        parts += ["--threads", str(measure["threads"])]
    if "batch_sizes" in measure and tuple(measure["batch_sizes"]) != (1, 64):
        parts += ["--batch-sizes", *map(str, measure["batch_sizes"])]
    for k in ("min_run_time", "rounds", "dtype", "channels_last", "compile"):
        if k in measure and measure[k] != getattr(default, k):
            parts += ["--measure", f"{k}={_scalar(measure[k])}"]
    if spec.get("pretrained"):
        parts += ["--weights", str(spec["pretrained"])] if spec["pretrained"] != "hub" else ["--pretrained"]
    if str(r.environment.get("device", "cpu")).startswith("cuda"):
        parts += ["--device", str(r.environment.get("device"))]
    parts += ["--out", out]
    return " ".join(shlex.quote(p) for p in parts)


def _method_defaults(name: str) -> Dict[str, Any]:
    from sparsebench.methods.base import METHODS, build_config, config_dict

    try:
        return config_dict(build_config(METHODS.get(name).factory, {}))
    except Exception:          # a method not installed here: spell out every argument
        return {}


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_scalar(x) for x in v) + "]"
    return str(v)


def run_details(r: RunRecord) -> Dict[str, Any]:
    """What a run page shows besides the numbers."""
    return {
        "spec": r.spec, "environment": r.environment, "code_version": r.code_version, "created": r.created,
        "structure": r.structure, "notes": r.notes, "selection": r.selection, "data": r.data,
        "dense_checkpoint": r.dense_checkpoint, "latency": r.latency, "error": r.error,
        "prunable": None if r.prunable is None else {"policy": r.prunable.policy,
                                                      "dense_layers": r.prunable.dense_layers,
                                                      "tensors": r.prunable.tensors},
        "tolerance": None if r.tolerance is None else f"-{r.tolerance.below:g} / +{r.tolerance.above:g}",
        "target_met": r.target_met, "schema": r.schema, "plugin": r.plugin,
        "realization": None if r.realization is None else {"realizable": r.realization.realizable,
                                                          "kind": r.realization.kind,
                                                          "reason": r.realization.reason,
                                                          **r.realization.details},
    }


def kept_structure(structure: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Kept units per layer or group, from a record's `structure` (channel groups, ViT blocks)."""
    if not structure:
        return []
    rows = []
    for g in structure.get("groups") or []:
        rows.append({"unit": g.get("root"), "kept": g.get("kept"), "of": g.get("size")})
    for i, b in enumerate(structure.get("blocks") or []):
        for part in ("heads", "mlp"):
            if b.get(part) is not None:
                rows.append({"unit": f"blocks.{i}.{part}", "kept": len(b[part]), "of": None})
    return rows


__all__ = ["FAMILIES", "family_of", "kept_structure", "reproduce_command", "run_details", "run_row", "runs_frame",
           "summarize", "as_float"]
