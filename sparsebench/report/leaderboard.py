"""Leaderboards rebuilt from records only: mean ± 95 % CI over seeds, per target.

Columns (docs: "Words"): `top1` test top-1 (%), `Δdense` against the shared dense
checkpoint, `sparsity` achieved over the prunable set, `flops` achieved FLOPs ratio
(realized MACs / dense MACs), `theor. speedup` dense/realized MACs, `measured speedup`
dense/realized latency at the throughput batch (or "not realizable") on `device`,
`params` non-zero.

Only runs with status "ok" enter the means and plots. Runs that missed their target
(beyond the tolerance in their record) or diverged are listed apart, one line each, so a
failed method is visible without dragging its averages. So is a run whose record shows
that its defining mechanism did not act (`mechanism.acted` false): its number is its
prior's, not the method's, and is never ranked silently among the others. Records of
different devices are different rows: a CPU and a GPU latency are never averaged together.

`mechanism` says, per row, whether the method's mechanism acted in every seed ("acted"), the
row is a null control ("control": the method with its mechanism switched off), or the method
is a baseline ("–"). `Δ control` is a seed-method row's paired difference to its own null
control at the same setting: the mean over the seeds both have of (method − control) top-1,
with its 95 % two-level interval (seeds and test images, `report/stats.py`; seed-level, marked
"‡", where a run kept no per-sample results), the number of pairs, the t-test's p, its Holm
adjustment over every Δ control and Δ baseline test of the (dataset, model, device) table
(`with_family_holm`), and the exact sign-flip p. `Δ baseline` is the same against the strongest
baseline at its setting: the best-mean row whose records say it is a baseline (mechanism "–"),
dense excluded. `Δ signal` is the same against the method's signal control (`Method.signal_controls`:
the mechanism run with its informative signal replaced by noise, e.g. RigL's against SET, C-GaP's
against random prune-back), "–" where none was run; with several declared, the one with the most
common seeds. Its tests join the same Holm family. `verdict` says which controls the row beat (a
positive difference, Holm-adjusted p < 0.05): "beats null and signal control", "beats null control
only", "beats signal control only", "beats neither control", or one of them with the other "not run".

`rank` (`stats.rank_rows`): within each (dataset, model, target, device) table every pair of
rows is compared, paired by seed (the two-level t-test, or McNemar's exact test on the
per-sample results when a single seed pairs), with Holm's correction over all of them; a
row's rank is 1 + the number of rows significantly better, tied ranks marked "=" ("2="),
ranks that rest on one seed's test samples marked "~" ("1~": test-set noise only), and a row
that pairs with no other row "unpaired". Rows are listed by rank, then mean. `seeds needed`
is the number of seeds a paired t-test would need to resolve a 1-point difference from the
best-mean row at 80 % power, from the observed spread of the per-seed differences.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import numpy as np
import pandas as pd
from scipy import stats

from sparsebench.methods.base import METHODS, method_label as args_label, signal_control_runs
from sparsebench.report.references import NOTE as PUBLISHED_NOTE, with_published
from sparsebench.report.stats import SeedRun, as_float, compare_runs, holm, rank_rows
from sparsebench.store.record import PerSample, RunRecord


def method_label(record: RunRecord) -> str:
    """Method name plus the config values that differ from its defaults (e.g. `random[distribution=erk]`),
    and "(κ× compute)" for a method whose optimizer steps run κ-wide rather than in sequence (P-GaP's
    replicas: its record's `total_steps` over `sequential_steps`), so it never reads as an equal budget."""
    label = args_label(record.method, record.method_args)
    total, depth = record.notes.get("total_steps"), record.notes.get("sequential_steps")
    if isinstance(total, int) and isinstance(depth, int) and 0 < depth < total:
        label += f" ({total / depth:g}× compute)"
    return label


def control_label(record: RunRecord) -> Optional[str]:
    """The label of this seed-method run's null control (its args with the mechanism switched
    off); None for a baseline, a control, or a method no longer installed."""
    if record.is_control:
        return None
    try:
        off = METHODS.get(record.method).factory.null_control
    except Exception:
        return None
    if not off:
        return None
    return args_label(record.method, {**record.method_args, **off})


def signal_control_labels(record: RunRecord) -> tuple:
    """The labels of this seed-method run's signal controls, in the order the method declares them
    (its args with each control's values, under the method a control names); () for a baseline, a
    null or signal control, or a method no longer installed."""
    if record.is_control or record.is_signal_control:
        return ()
    return tuple(args_label(method, args) for _, method, args in signal_control_runs(record.method, record.method_args))


def mechanism_of(record: RunRecord) -> str:
    """The record's verdict in one word: acted | did not act | control | none | not recorded."""
    return "not recorded" if record.mechanism is None else record.mechanism.label


def _spent_macs(r: RunRecord, stages) -> Optional[float]:
    """Forward + backward MACs the record's `stages` spent; None if any went uncounted."""
    spent = r.cost.train_macs or {}
    parts = [spent.get(stage) for stage in stages]
    if any(p is None or not p.get("complete", True) for p in parts):
        return None
    return float(sum(p["forward"] + p["backward"] for p in parts))


def _train_macs(r: RunRecord):
    """Forward + backward MACs of the method and the fine-tune (the run's own training; the shared
    dense pretrain is the same for every method of a (model, seed) and stays out); None if uncounted."""
    return _spent_macs(r, ("method", "finetune"))


def _total_cost(r: RunRecord):
    """(optimizer steps, forward + backward MACs) of everything the run's result needed: the method
    and the fine-tune, plus the dense pretrain for a method that starts from it (a scratch method
    trained its own weights; a pruning method's result needed the pretrain). MACs None if uncounted."""
    c = r.cost
    pretrained = r.starts_from == "pretrained"
    steps = c.method_steps + c.finetune_steps + (c.dense_pretrain_steps if pretrained else 0)
    return steps, _spent_macs(r, ("method", "finetune") + (("dense_pretrain",) if pretrained else ()))


SPARSE_KERNEL_KINDS = ("auto", "csr", "2:4")


def realization_label(realization: Optional[dict]) -> Optional[str]:
    """The realization named beside a measured speedup where sparse kernels could have run it:
    "auto", "csr", "2:4"; "auto: all dense" where no layer won its calibration (the masked model
    run dense). None for dense and compacted models (a smaller dense model needs no name)."""
    if not realization or realization.get("kind") not in SPARSE_KERNEL_KINDS:
        return None
    kind = realization["kind"]
    return f"{kind}: all dense" if realization.get("sparse_layers") == 0 else kind


def entry_label(entry: Optional[dict]) -> Optional[str]:
    """The (realization, runtime) named beside a measured speedup (`RunRecord.latency_entries`):
    "auto, eager", "auto: all dense, compile", "csr, eager"; for a dense or compacted model only a
    runtime other than eager ("onnxruntime"). None where there is nothing to name."""
    if not entry:
        return None
    kind = realization_label({"kind": entry.get("realization"), "sparse_layers": entry.get("sparse_layers")})
    runtime = entry.get("runtime") or "eager"
    if kind:
        return f"{kind}, {runtime}"
    return None if runtime == "eager" else runtime


def speed_fields(r: RunRecord, device: str) -> dict:
    """The row's measured speedup on `device`: the fastest (realization, runtime) measured there at
    the throughput batch, named, with its bootstrap interval; not realizable where no realizer ran on
    that device. The leaderboard's rows and the report's run rows both read it."""
    best = r.best_latency_entry(device)
    return {"device": device, "measured_speedup": None if best is None else best["measured_speedup"],
            "measured_speedup_ci95": None if best is None else best.get("speedup_ci95"),
            "realizable": best is not None or (device == r.device and r.realization.realizable),
            "realization": entry_label(best)}


def _labels(values: pd.Series) -> Optional[str]:
    """The realizations of a row's seeds, joined (seeds may choose differently)."""
    names = sorted({v for v in values if isinstance(v, str) and v})
    return " / ".join(names) or None


# a training stage whose steps waited this long for their batches was starved by its data loading
STARVED_WAIT = 0.2


def starved_stages(record: RunRecord, threshold: float = STARVED_WAIT) -> List[str]:
    """The training stages of a run whose steps waited for data more than `threshold` of their time
    (the record's `resources`; none where it has none)."""
    stages = ((record.resources or {}).get("stages") or {})
    return [s for s, used in stages.items() if (used.get("loader_wait_fraction") or 0) > threshold]


def records_frame(records: Iterable[RunRecord]) -> pd.DataFrame:
    """One row per record; metric columns are empty for runs without a result (diverged). Runs that
    share a label and a setting but not a recipe are told apart (`with_recipe_labels`)."""
    rows, recipes = [], []
    for r in records:
        total_steps, total_macs = _total_cost(r)
        row = {
            "dataset": r.dataset, "model": r.model, "method": method_label(r), "seed": r.seed,
            "granularity": r.granularity, "target_kind": r.target_kind, "target": r.target_value,
            "status": r.status, "device": r.device, "error": r.error, "run_id": r.run_id,
            "dense_top1": None if r.dense_test_top1 is None else 100 * r.dense_test_top1,   # None: dense diverged
            "method_steps": r.cost.method_steps, "method_seconds": r.cost.method_wall_seconds,
            "train_macs": _train_macs(r),
            "total_steps": total_steps, "total_train_macs": total_macs,
            "tolerance": None if r.tolerance is None else f"-{r.tolerance.below:g}/+{r.tolerance.above:g}",
            "mechanism": mechanism_of(r),
            "mechanism_reason": None if r.mechanism is None else r.mechanism.reason,
            "control_of_row": control_label(r),
            "signal_controls_of_row": signal_control_labels(r),
            "per_sample": r.per_sample,
            "starved": len(starved_stages(r)) > 0,
        }
        if r.has_result:
            row.update({
                "test_top1": 100 * r.test_top1, "test_top5": None if r.test_top5 is None else 100 * r.test_top5,
                "achieved_sparsity": r.achieved_sparsity, "achieved_flops_ratio": r.achieved_flops_ratio,
                "macs_effective": r.macs.effective, "macs_dense": r.macs.dense, "params_nonzero": r.params.nonzero,
                "theoretical_speedup": r.theoretical_speedup, **speed_fields(r, r.device),
            })
        extra = retimed_rows(r, row)
        rows += [row, *extra]
        recipes += [dict(r.spec.get("recipe") or {})] * (1 + len(extra))
    return with_recipe_labels(pd.DataFrame(rows), recipes)


LABEL_SETTING = ["dataset", "model", "target_kind", "target", "device"]


def with_recipe_labels(df: pd.DataFrame, recipes: List[dict]) -> pd.DataFrame:
    """Where runs of one label at one setting trained under different recipes (PASS searched for 2
    and for 6 epochs), each label gets the recipe values that differ, `pass[...] {search_epochs=6}`,
    and so do the control labels its runs name: their means never mix two recipes' seeds. Labels
    that do not collide stay as they are. `recipes`: each row's recipe, in row order."""
    if df.empty:
        return df
    setting = [tuple(v) for v in df[LABEL_SETTING].astype(str).itertuples(index=False)]
    varying: Dict[tuple, List[str]] = {}
    by_label: Dict[tuple, List[dict]] = {}
    for at, label, recipe in zip(setting, df["method"], recipes):
        by_label.setdefault((at, label), []).append(recipe)
    for key, seen in by_label.items():
        keys = sorted(k for k in set().union(*seen) if len({repr(r.get(k)) for r in seen}) > 1)
        if keys:
            varying[key] = keys

    def suffixed(at, label, recipe, keys=None):
        keys = keys or varying.get((at, label))
        return label if not keys else f"{label} {{{','.join(f'{k}={recipe.get(k)}' for k in keys)}}}"

    def control(at, label, control_label, recipe):
        """The control's label as its rows carry it; where only the method's runs differ in recipe,
        the plain control pairs with the runs whose recipe it shares and no control with the others."""
        if control_label is None or (isinstance(control_label, float) and math.isnan(control_label)):
            return None
        if (at, control_label) in varying or (at, label) not in varying:
            return suffixed(at, control_label, recipe)
        keys = varying[(at, label)]
        theirs = by_label.get((at, control_label), [{}])[0]
        same = all(repr(theirs.get(k)) == repr(recipe.get(k)) for k in keys)
        return control_label if same else suffixed(at, control_label, recipe, keys)

    if not varying:
        return df
    df = df.copy()
    labels = list(df["method"])
    df["method"] = [suffixed(at, m, rc) for at, m, rc in zip(setting, labels, recipes)]
    df["control_of_row"] = [control(at, m, c, rc) for at, m, c, rc in zip(setting, labels, df["control_of_row"], recipes)]
    df["signal_controls_of_row"] = [tuple(control(at, m, c, rc) for c in cs)
                                    for at, m, cs, rc in zip(setting, labels, df["signal_controls_of_row"], recipes)]
    return df


def retimed_rows(r: RunRecord, row: dict) -> list:
    """The run's row again for each other device it was re-timed on (`sparsebench retime`): same
    accuracy, that device's fastest measured speedup, so each device is its own table and latencies
    never mix. Re-timings on the run's own device sit in its own row (`speed_fields`)."""
    if not r.has_result:
        return []
    devices = dict.fromkeys(e["device"] for e in r.latency_entries() if e["device"] != r.device)
    return [{**row, **speed_fields(r, device)} for device in devices]


def ci95(values: pd.Series) -> float:
    """Half-width of the 95 % t-interval of the mean; NaN for a single seed."""
    v = values.dropna()
    if len(v) < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def ranked(df: pd.DataFrame) -> pd.DataFrame:
    """The runs that enter the means: status "ok" and, where the record has a verdict, a
    mechanism that acted (or a null control, or a baseline)."""
    if df.empty:
        return df
    return df[(df["status"] == "ok") & (df["mechanism"] != "did not act")]


COST_VIEWS = {"steps": "total_steps", "macs": "total_train_macs"}


def with_cost_groups(runs: pd.DataFrame, by: str, tolerance: float = 0.15) -> pd.DataFrame:
    """Add `cost_group` to every run: rows of one (dataset, model, target, device) setting whose
    mean total training cost (`by`: "steps" or "macs", see `_total_cost`) lies within a factor
    1 + `tolerance` of the cheapest row of their group share a group, labelled by its mean cost.
    Groups are formed greedily from the cheapest row up. A row whose cost was not counted is its
    own group, "cost not recorded"."""
    if by not in COST_VIEWS:
        raise ValueError(f"unknown equal-cost view {by!r}; allowed: {', '.join(COST_VIEWS)}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"cost tolerance must be in [0, 1), got {tolerance}")
    column = COST_VIEWS[by]
    setting = ["dataset", "model", "target_kind", "target", "device"]
    runs = runs.assign(cost_group="cost not recorded")
    if runs.empty:
        return runs
    costs = runs.assign(_cost=runs[column].astype(float)).groupby(setting + ["method"], dropna=False)["_cost"].mean()
    labels = {}
    for at, part in costs.groupby(level=list(range(len(setting))), dropna=False):
        group, first = [], None
        for key, cost in sorted(((k, v) for k, v in part.items() if not pd.isna(v)), key=lambda kv: kv[1]):
            if first is None or cost > first * (1 + tolerance):
                if group:
                    labels.update(_cost_label(group, by))
                group, first = [], cost
            group.append((key, cost))
        if group:
            labels.update(_cost_label(group, by))
    keys = [tuple(r) for r in runs[setting + ["method"]].itertuples(index=False)]
    return runs.assign(cost_group=[labels.get(k, "cost not recorded") for k in keys])


def _cost_label(group, by: str) -> Dict[tuple, str]:
    mean = sum(c for _, c in group) / len(group)
    label = f"≈{mean:,.0f} steps" if by == "steps" else f"≈{mean / 1e9:.1f} train GMACs"
    return {key: label for key, _ in group}


def aggregate(df: pd.DataFrame, equal_cost: Optional[str] = None, cost_tolerance: float = 0.15) -> pd.DataFrame:
    """One row per (dataset, model, method, target, device): means and 95 % CIs over the seeds
    whose run is "ok" (met its target, finite) and whose mechanism did not fail to act; other
    runs are `excluded`'s. Seed-method rows carry their paired difference to their control.

    `equal_cost` ("steps" | "macs"): the equal-cost view. Rows of a setting are further split into
    groups of equal total training cost (`with_cost_groups`), and ranks and `Δ baseline` are
    computed within each group, so a method is ranked only against rows that spent as much;
    `Δ control` still pairs each row with its control at the setting."""
    if not df.empty:
        df = ranked(df)
    if df.empty:
        return pd.DataFrame()
    keys = ["dataset", "model", "method", "granularity", "target_kind", "target", "device"]
    df = df.assign(target=df["target"].astype(float).fillna(-1.0), delta=df["test_top1"] - df["dense_top1"],
                   measured_speedup=df["measured_speedup"].astype(float), realizable=df["realizable"].astype(bool))
    if equal_cost is not None:
        df = with_cost_groups(df, equal_cost, cost_tolerance)
    groups = keys + ([] if equal_cost is None else ["cost_group"])
    out = df.groupby(groups, dropna=False).agg(
        seeds=("seed", "nunique"),
        top1=("test_top1", "mean"), top1_ci=("test_top1", ci95),
        top5=("test_top5", "mean"),
        delta=("delta", "mean"), delta_ci=("delta", ci95),
        sparsity=("achieved_sparsity", "mean"), flops=("achieved_flops_ratio", "mean"),
        macs=("macs_effective", "mean"), params=("params_nonzero", "mean"),
        theoretical_speedup=("theoretical_speedup", "mean"),
        measured_speedup=("measured_speedup", "mean"), measured_speedup_ci=("measured_speedup", ci95),
        realizable=("realizable", "any"), speedup_seeds=("measured_speedup", "count"),
        realization=("realization", _labels),
        method_steps=("method_steps", "mean"),
        train_macs=("train_macs", "mean"),
        total_steps=("total_steps", "mean"), total_train_macs=("total_train_macs", "mean"),
        mechanism=("mechanism", row_mechanism),
        starved=("starved", "sum"),
    ).reset_index()
    out = with_signal_differences(with_control_differences(out, df, keys), df, keys)
    setting = [k for k in keys if k not in ("method", "granularity")] + ([] if equal_cost is None else ["cost_group"])
    out = with_family_holm(with_baseline_differences(with_ranks(out, df, setting), df, setting))
    out["target"] = out["target"].replace(-1.0, np.nan)
    kind_order = out["target_kind"].map({"none": 0, "sparsity": 1, "flops": 2})
    # within a target, equal-cost groups from the cheapest up (0 without the view), then by rank (1 + rows
    # significantly better; unranked rows last), then by mean top-1
    cost = (out[COST_VIEWS[equal_cost]].astype(float).fillna(float("inf")) if equal_cost is not None
            else pd.Series(0.0, index=out.index))
    group_cost = cost.groupby([out[k] for k in setting], dropna=False).transform("min")
    out = (out.assign(_kind=kind_order, _cost=group_cost, _rank=out["rank_position"].astype(float).fillna(float("inf")))
              .sort_values(["dataset", "model", "_kind", "target", "_cost", "_rank", "top1"],
                           ascending=[True, True, True, False, True, True, False])
              .drop(columns=["_kind", "_cost", "_rank"]).reset_index(drop=True))
    if equal_cost is not None:
        out.attrs["cost_tolerance"] = cost_tolerance       # the table's footnote states the grouping used
    return out


def row_mechanism(labels: pd.Series) -> str:
    """One word for a row: control, signal control, acted (every seed acted), – (baseline), not recorded."""
    kinds = set(labels)
    if kinds == {"control"}:
        return "control"
    if kinds == {"signal control"}:
        return "signal control"
    if kinds == {"acted"}:
        return "acted"
    if kinds == {"did not act"}:            # only in a list of left-out runs: `ranked` never admits them
        return "did not act"
    if kinds <= {"none"}:
        return "–"
    return "not recorded" if "not recorded" in kinds else "mixed"


PAIRED_FIELDS = ("delta", "delta_ci", "pairs", "p", "p_sign_flip", "p_holm", "test_noise", "interval_note")


def paired_columns(prefix: str, c) -> Dict[str, object]:
    """A paired comparison (`stats.Comparison`) as `{prefix}_delta`, `_delta_ci` (95 % half-width:
    two-level where per-sample results allow, else seed-level), `_pairs`, `_p` (the deciding
    p-value, raw), `_p_sign_flip` (exact), `_test_noise` (the interval includes test-set noise)
    and `_interval_note` (why it does not); `_p_holm` is filled per table by `with_family_holm`."""
    level = c.seed_level
    return {f"{prefix}_delta": level.mean, f"{prefix}_delta_ci": (c.high - c.low) / 2, f"{prefix}_pairs": level.pairs,
            f"{prefix}_p": float("nan") if c.p_value is None else c.p_value,
            f"{prefix}_p_sign_flip": level.p_sign_flip, f"{prefix}_p_holm": float("nan"),
            f"{prefix}_test_noise": c.test_noise, f"{prefix}_interval_note": c.interval_note}


def with_control_differences(out: pd.DataFrame, runs: pd.DataFrame, keys: List[str]) -> pd.DataFrame:
    """Add the `control_*` columns (`paired_columns`): each seed-method row's paired difference
    (method − its null control, top-1 points) over the seeds both have, by the same statistics
    as `Δ baseline` (`compare_runs`: two-level interval and t-test, exact sign-flip p)."""
    setting = [k for k in keys if k not in ("method", "granularity")]
    by_run = seed_runs(runs, setting)
    control_of = runs.dropna(subset=["control_of_row"]).groupby("method")["control_of_row"].first()
    rows = []
    for _, row in out.iterrows():
        control = control_of.get(row["method"])
        at = tuple(row[k] for k in setting)
        c = compare_runs(by_run.get((at, row["method"]), {}), by_run.get((at, control), {}) if control else {},
                         per_sample="none")
        rows.append(paired_columns("control", c))
    return out.assign(**{f"control_{k}": [r[f"control_{k}"] for r in rows] for k in PAIRED_FIELDS})


def with_signal_differences(out: pd.DataFrame, runs: pd.DataFrame, keys: List[str]) -> pd.DataFrame:
    """Add `signal` (the label of the signal control it is paired with) and the `signal_*` columns
    (`paired_columns`): each seed-method row's paired difference (method − its signal control) over
    the seeds both have, by the statistics of `Δ control`. A method declaring several signal
    controls is paired with the one that shares the most seeds with it (the first declared on a tie);
    the others that ran are in `signal_more` (one dict per control: `label` and `paired_columns("more")`),
    in the Holm family too, and in the `Δ signal` cell and the verdict after the first."""
    setting = [k for k in keys if k not in ("method", "granularity")]
    by_run = seed_runs(runs, setting)
    if "signal_controls_of_row" in runs:
        declared = runs.groupby("method")["signal_controls_of_row"].first()
    else:
        declared = pd.Series(dtype=object)
    labels, rows, more = [], [], []
    for _, row in out.iterrows():
        at = tuple(row[k] for k in setting)
        mine = by_run.get((at, row["method"]), {})
        candidates = declared.get(row["method"])
        best, best_c, run = None, None, []
        for label in (candidates if isinstance(candidates, tuple) else ()):
            c = compare_runs(mine, by_run.get((at, label), {}), per_sample="none")
            if c.pairs:
                run.append((label, c))
            if c.pairs and (best_c is None or c.pairs > best_c.pairs):
                best, best_c = label, c
        labels.append(best)
        rows.append(paired_columns("signal", best_c if best_c is not None else compare_runs(mine, {}, per_sample="none")))
        # the method's other signal controls that ran (the sanity checks beside the primary one)
        more.append([{"label": label, **paired_columns("more", c)} for label, c in run if label != best])
    return out.assign(signal=labels, signal_more=more,
                      **{f"signal_{k}": [r[f"signal_{k}"] for r in rows] for k in PAIRED_FIELDS})


FAMILY = ["dataset", "model", "device"]


def with_family_holm(out: pd.DataFrame, family: List[str] = FAMILY, rows=None) -> pd.DataFrame:
    """Fill `control_p_holm`, `signal_p_holm` and `baseline_p_holm`: Holm's correction over every
    Δ control, Δ signal and Δ baseline test of one table (`family`: one (dataset, model, device), all its targets), so the
    verdicts a table makes hold together at 95 %. `rows`: a boolean mask of the rows that belong
    to the tables (default all)."""
    if out.empty:
        return out
    out = out.copy()
    mask = pd.Series(True, index=out.index) if rows is None else rows
    more = out["signal_more"] if "signal_more" in out else pd.Series(None, index=out.index)
    for _, part in out[mask].groupby(family, sort=False, dropna=False):
        tests = [(index, prefix) for index in part.index for prefix in ("control", "signal", "baseline")
                 if f"{prefix}_p" in out and as_float(out.at[index, f"{prefix}_p"]) is not None]
        extra = [m for index in part.index if isinstance(more[index], list)
                 for m in more[index] if as_float(m["more_p"]) is not None]
        adjusted = holm([float(out.at[i, f"{k}_p"]) for i, k in tests] + [float(m["more_p"]) for m in extra])
        for (index, prefix), p in zip(tests, adjusted):
            out.at[index, f"{prefix}_p_holm"] = p
        for m, p in zip(extra, adjusted[len(tests):]):
            m["more_p_holm"] = p
    return out


def seed_runs(runs: pd.DataFrame, setting: List[str]) -> Dict[tuple, Dict[int, SeedRun]]:
    """{(setting values, method): {seed: SeedRun}} of the runs that enter the means (`test_top1` in points)."""
    out: Dict[tuple, Dict[int, SeedRun]] = {}
    for _, r in runs.iterrows():
        top1 = as_float(r.get("test_top1"))
        if top1 is None:
            continue
        ps = r.get("per_sample")
        out.setdefault((tuple(r[k] for k in setting), r["method"]), {})[int(r["seed"])] = SeedRun(
            top1, ps if isinstance(ps, PerSample) else None, str(r.get("run_id") or ""))
    return out


def with_ranks(out: pd.DataFrame, runs: pd.DataFrame, setting: List[str], rankable=None) -> pd.DataFrame:
    """Add `rank` ("1", "2=", "3", "1~", "unpaired": `stats.rank_rows`), `rank_position` (its
    number; NaN unranked), `rank_p` (Holm-adjusted p against the best-mean row), `rank_basis`,
    `rank_pairs` and `seeds_needed` (to resolve 1 point against the best-mean row at 80 % power)
    per (setting) table. `rankable`: a boolean mask of the rows to rank (default all)."""
    columns = {"rank": "", "rank_p": float("nan"), "rank_basis": "", "rank_pairs": 0, "seeds_needed": float("nan"),
               "rank_position": float("nan")}
    out = out.assign(**columns)
    if out.empty:
        return out
    by_run = seed_runs(runs, setting)
    mask = pd.Series(True, index=out.index) if rankable is None else rankable
    for at, part in out[mask].groupby(setting, sort=False, dropna=False):
        at = at if isinstance(at, tuple) else (at,)
        ranks = rank_rows(list(part["top1"].astype(float)),
                          [by_run.get((tuple(at), m), {}) for m in part["method"]])
        for index, rank in zip(part.index, ranks):
            out.at[index, "rank"] = rank.label
            out.at[index, "rank_p"] = float("nan") if rank.p_adjusted is None else rank.p_adjusted
            out.at[index, "rank_basis"] = rank.basis
            out.at[index, "rank_pairs"] = rank.pairs
            out.at[index, "seeds_needed"] = float("nan") if rank.seeds_needed is None else rank.seeds_needed
            out.at[index, "rank_position"] = float("nan") if rank.position is None else rank.position
    return out


def is_baseline_row(method: str, mechanism: str) -> bool:
    """A baseline for `Δ baseline`: its records say it has no mechanism ("–"); the dense reference excluded."""
    return mechanism == "–" and method.split("[", 1)[0] != "dense"


def with_baseline_differences(out: pd.DataFrame, runs: pd.DataFrame, setting: List[str], rankable=None) -> pd.DataFrame:
    """Add `baseline` (the strongest baseline's label at the row's setting) and the `baseline_*`
    columns (`paired_columns`) to each seed-method row (its mechanism acted, or acted in some
    seeds): paired over the seeds both have."""
    out = out.assign(baseline=None, baseline_delta=float("nan"), baseline_delta_ci=float("nan"), baseline_pairs=0,
                     baseline_p=float("nan"), baseline_p_sign_flip=float("nan"), baseline_p_holm=float("nan"),
                     baseline_test_noise=False, baseline_interval_note="")
    if out.empty:
        return out
    by_run = seed_runs(runs, setting)
    mask = pd.Series(True, index=out.index) if rankable is None else rankable
    for at, part in out[mask].groupby(setting, sort=False, dropna=False):
        at = tuple(at) if isinstance(at, tuple) else (at,)
        bases = part[[is_baseline_row(m, k) for m, k in zip(part["method"], part["mechanism"])]]
        if bases.empty:
            continue
        strongest = bases.loc[bases["top1"].astype(float).idxmax(), "method"]
        for index, row in part[part["mechanism"].isin(["acted", "mixed"])].iterrows():
            c = compare_runs(by_run.get((at, row["method"]), {}), by_run.get((at, strongest), {}), per_sample="none")
            if not c.pairs:
                continue
            out.at[index, "baseline"] = strongest
            for column, value in paired_columns("baseline", c).items():
                out.at[index, column] = value
    return out


def excluded(df: pd.DataFrame) -> pd.DataFrame:
    """The runs left out of the means: one row each, with what went wrong."""
    if df.empty:
        return pd.DataFrame()
    bad = df[(df["status"] != "ok") | (df["mechanism"] == "did not act")]
    rows = []
    for _, r in bad.iterrows():
        target = "dense" if r["target_kind"] == "none" else f"{r['target_kind']}={r['target']:g}"
        status = r["status"]
        if status == "ok":                  # a result, but the mechanism that defines the method did not act
            status, detail = "mechanism did not act", r["mechanism_reason"] or ""
        elif r["status"] == "missed_target":
            achieved = r["achieved_sparsity"] if r["target_kind"] == "sparsity" else r["achieved_flops_ratio"]
            detail = f"achieved {achieved:.4f}, tolerance {r['tolerance']}"
        else:
            detail = r["error"] or ""
        rows.append({"dataset": r["dataset"], "model": r["model"], "target": target, "method": r["method"],
                     "seed": int(r["seed"]), "status": status, "detail": detail})
    return pd.DataFrame(rows)


@dataclass
class Leaderboard:
    table: pd.DataFrame              # aggregated "ok" runs (see `aggregate`)
    excluded: pd.DataFrame           # missed-target, diverged and failed runs, one row each

    @classmethod
    def of(cls, records: Iterable[RunRecord], equal_cost: Optional[str] = None,
           cost_tolerance: float = 0.15) -> "Leaderboard":
        """`equal_cost` "steps" | "macs": the equal-cost view (see `aggregate`)."""
        df = records_frame(records)
        return cls(aggregate(df, equal_cost, cost_tolerance), excluded(df))


def plus_minus(mean, ci, fmt: str) -> str:
    """"mean ± half-width" ("–" without a mean, no interval without one); a signed mean, an unsigned half-width."""
    m, c = as_float(mean), as_float(ci)
    if m is None:
        return "–"
    return format(m, fmt) + ("" if c is None else f" ± {format(c, fmt.lstrip('+'))}")


def table_csv(agg: pd.DataFrame) -> str:
    """The aggregate table as CSV; `signal_more` (a list per row) as JSON, so a reader parses it."""
    if "signal_more" in agg:
        agg = agg.assign(signal_more=[json.dumps(v, default=float) if isinstance(v, list) and v else ""
                                      for v in agg["signal_more"]])
    return agg.to_csv(index=False)


def display_table(agg: pd.DataFrame) -> pd.DataFrame:
    """Human-readable columns for Markdown / terminal / HTML."""
    rows = []
    for _, r in agg.iterrows():
        target = "dense" if r["target_kind"] == "none" else f"{r['target_kind']}={r['target']:g}"
        timed = r.get("speedup_seeds")
        partly = timed is not None and not pd.isna(timed) and 0 < timed < r["seeds"]
        named = [r["realization"]] if isinstance(r.get("realization"), str) else []
        named += [f"{int(timed)} of {int(r['seeds'])} seeds timed"] if partly else []
        measured = (plus_minus(r["measured_speedup"], r["measured_speedup_ci"], ".2f") + "×"
                    + (f" ({'; '.join(named)})" if named else "")) \
            if r["realizable"] and not pd.isna(r["measured_speedup"]) else \
            ("not realizable" if not r["realizable"] else "not timed")
        rows.append({
            "dataset": r["dataset"], "model": r["model"], "target": target,
            **({"cost": r["cost_group"]} if "cost_group" in r else {}),
            "rank": r.get("rank") or "", "method": r["method"],
            "top1 (%)": plus_minus(r["top1"], r["top1_ci"], ".2f"),
            "Δ dense": plus_minus(r["delta"], r["delta_ci"], "+.2f"),
            "sparsity": f"{r['sparsity']:.3f}", "FLOPs ratio": f"{r['flops']:.3f}",
            "MMACs": f"{r['macs'] / 1e6:.2f}", "params": f"{r['params'] / 1e3:.1f}k",
            "theor. speedup": f"{r['theoretical_speedup']:.2f}×", "measured speedup": measured,
            "train GMACs": "–" if pd.isna(r.get("train_macs")) else f"{r['train_macs'] / 1e9:.1f}",
            "mechanism": r.get("mechanism", "not recorded"),
            "Δ control": _control_cell(r),
            "Δ signal": signal_cell(r),
            "verdict": controls_verdict(r),
            "Δ baseline": baseline_cell(r),
            "seeds needed": seeds_needed_cell(r.get("seeds_needed")),
            "device": r["device"], "seeds": int(r["seeds"]),
        })
    return with_published(pd.DataFrame(rows), agg)      # "published", "Δ published" where a reference matches


def format_p(v) -> str:
    """A p-value for a table: three decimals, or two significant digits below 0.001; "–" without one."""
    f = as_float(v)
    return "–" if f is None else (f"{f:.2g}" if f < 0.001 else f"{f:.3f}")


def paired_cell(r, prefix: str, against: str = "") -> str:
    """"+1.23 ± 0.45 vs X (n=5; p 0.031, Holm 0.093, sign-flip 0.062)" for a row's `{prefix}_*`
    columns (`paired_columns`), "–" without a pair. "‡" after the interval: seed-level only (a run
    without per-sample results), so it leaves out the test set's sampling noise."""
    n = int(as_float(r.get(f"{prefix}_pairs")) or 0)
    if not n:
        return "–"
    seed_level_only = n >= 2 and as_float(r.get(f"{prefix}_test_noise")) != 1.0
    cell = plus_minus(r[f"{prefix}_delta"], r.get(f"{prefix}_delta_ci"), "+.2f") + ("‡" if seed_level_only else "")
    cell += (f" vs {against}" if against else "") + f" (n={n}"
    p = as_float(r.get(f"{prefix}_p"))
    if n >= 2 and p is not None:
        cell += f"; p {format_p(p)}"
        if as_float(r.get(f"{prefix}_p_holm")) is not None:
            cell += f", Holm {format_p(r[f'{prefix}_p_holm'])}"
        if as_float(r.get(f"{prefix}_p_sign_flip")) is not None:
            cell += f", sign-flip {format_p(r[f'{prefix}_p_sign_flip'])}"
    return cell + ")"


def _control_cell(r) -> str:
    """Δ control: `paired_cell` of the row's difference to its null control, else "–"."""
    return paired_cell(r, "control")


def signal_cell(r, name=lambda m: m) -> str:
    """Δ signal: `paired_cell` of the row's difference to its signal control, named; "–" without one."""
    if not int(as_float(r.get("signal_pairs")) or 0):
        return "–"
    cell = paired_cell(r, "signal", against=name(r["signal"]))
    for m in more_signal_controls(r):
        cell += "; " + paired_cell(m, "more", against=name(m["label"]))
    return cell


def more_signal_controls(r) -> list:
    """The row's signal controls beyond the first (`signal_more`), each a dict of `more_*` paired fields."""
    more = r.get("signal_more")
    return more if isinstance(more, list) else []


VERDICT_ALPHA = 0.05


def separated(r, prefix: str) -> Optional[float]:
    """The paired difference of `{prefix}_*` where it is significant (Holm-adjusted p, or the raw p
    where the table was not adjusted, below 0.05), 0.0 where it is not, None where no such control
    was run (or a single pair: no test)."""
    if int(as_float(r.get(f"{prefix}_pairs")) or 0) < 2:
        return None
    p = as_float(r.get(f"{prefix}_p_holm"))
    p = as_float(r.get(f"{prefix}_p")) if p is None else p
    delta = as_float(r.get(f"{prefix}_delta"))
    return delta if p is not None and delta is not None and p < VERDICT_ALPHA else 0.0


def beats(r, prefix: str) -> Optional[bool]:
    """Whether a row beat the control of `{prefix}_*` (a significantly positive paired difference);
    None where no such control was run (or a single pair: no test)."""
    delta = separated(r, prefix)
    return None if delta is None else delta > 0


def loses_to(r, prefix: str) -> bool:
    """Whether a row fell significantly *below* the control of `{prefix}_*` (a negative paired
    difference with Holm p < 0.05): the mechanism did harm."""
    return (separated(r, prefix) or 0.0) < 0


def controls_verdict(r) -> str:
    """Which controls a seed-method row beat: "beats null and signal control", "beats null control
    only", "beats signal control only", "beats neither control"; where one control was not run,
    "beats null control (signal control not run)", "does not beat signal control (null control not
    run)", ...; "; below null control" (or signal) where it fell significantly below one; "–" for a
    row tested against neither, and for a control itself."""
    if r.get("mechanism") in ("control", "signal control"):
        return "–"
    null, signal = beats(r, "control"), beats(r, "signal")
    if null is None and signal is None:
        return "–"
    if null is not None and signal is not None:
        if null and signal:
            verdict = "beats null and signal control"
        elif null or signal:
            verdict = f"beats {'null' if null else 'signal'} control only"
        else:
            verdict = "beats neither control"
    else:
        tested, missing = ("null", "signal") if null is not None else ("signal", "null")
        won = null if null is not None else signal
        verdict = f"{'beats' if won else 'does not beat'} {tested} control ({missing} control not run)"
    below = [word for prefix, word in (("control", "null"), ("signal", "signal")) if loses_to(r, prefix)]
    verdict += f"; below {' and '.join(below)} control" if below else ""
    for m in more_signal_controls(r):
        if beats(m, "more"):
            verdict += f"; beats {m['label']}"
        elif loses_to(m, "more"):
            verdict += f"; below {m['label']}"
    return verdict


def baseline_cell(r, name=lambda m: m) -> str:
    """Δ baseline: `paired_cell` of the row's difference to the strongest baseline, named by `name`."""
    if not int(as_float(r.get("baseline_pairs")) or 0):
        return "–"
    return paired_cell(r, "baseline", against=name(r["baseline"]))


def seeds_needed_cell(v) -> str:
    f = as_float(v)
    return "–" if f is None else f"{f:.0f}"


DIFFERENCES_NOTE = (
    "Δ control: paired difference (method − its null control) in top-1 points over the seeds both have; "
    "Δ signal: the same against the method's signal control (its mechanism run with the informative signal "
    "replaced by noise, named after \"vs\"; – where none was run; of several, each that ran, after \";\"); "
    "Δ baseline: the same against the strongest baseline at the same target (best-mean row without a mechanism, "
    "dense excluded). ±: 95 % interval over seeds and test images, so the sampling noise of the test set every "
    "seed shares is in it (two-level: crossed seeds × images variance components, σ²_seed/n + σ²_image/m + "
    "σ²_residual/(n·m), t with n − 1 degrees of freedom; never narrower than the seed-level t-interval); "
    "‡: seed-level t-interval only (a run without per-sample results). p: the t-test of that interval "
    "(the exact sign-flip p where every seed gives the same difference); Holm: Holm-adjusted over every "
    "Δ control, Δ signal and Δ baseline test of this (dataset, model, device) table, the p a verdict should use; "
    "sign-flip: exact permutation p over the 2^n sign patterns of the n per-seed differences (never below 2/2^n: "
    "0.0625 with 5 seeds). verdict: which controls the row beat (a positive difference with Holm p < 0.05): "
    "null and signal, one only, neither, or the one tested with the other not run; \"below\" where it fell "
    "significantly below a control, and each further signal control it separated from.")
RANK_NOTE = (
    "rank: 1 + the number of rows significantly better at 95 % (every pair of rows of a target compared, paired "
    "over seeds as above, Holm-corrected over all of them); rows sharing a rank are marked \"=\" (\"1=\"). "
    "\"~\" (\"1~\"): the rank rests on a single seed, by the exact McNemar test on that seed's per-sample "
    "results: test-set noise only, no training noise, so it says nothing about another seed. \"unpaired\": no "
    "row it could be compared with (no common seed, or one seed without per-sample results), no rank; "
    "\"(partly unpaired)\": ranked only against the rows it pairs with.")


def to_markdown(agg: pd.DataFrame, title: str = "Leaderboard", left_out: pd.DataFrame = None) -> str:
    table = display_table(agg)
    lines: List[str] = [f"# {title}", ""]
    if table.empty:
        lines += ["(no records)", ""]
    for (dataset, model), part in ([] if table.empty else table.groupby(["dataset", "model"], sort=False)):
        lines += [f"## {model} on {dataset}", "", part.drop(columns=["dataset", "model"]).to_markdown(index=False), ""]
    if left_out is not None and not left_out.empty:
        lines += ["## Left out of the means: missed target, diverged, or mechanism did not act", "",
                  left_out.to_markdown(index=False), ""]
    if table.empty:
        return "\n".join(lines)
    lines += [
        "top1: test top-1 (%), mean ± 95 % CI over seeds (t-interval; none with one seed); model selected on a "
        "validation split carved from train, test evaluated once. Δ dense: against the shared dense checkpoint "
        "(a description, seed-level t-interval, no verdict and no test). "
        "train GMACs: forward + backward MACs of the method and the fine-tune (sparse training counted sparse; "
        "the shared dense pretrain left out). "
        "sparsity: zero or removed fraction of prunable weights. FLOPs ratio: realized MACs / dense MACs "
        "(attention matmuls counted). theor. speedup: dense / realized MACs. measured speedup: dense / realized "
        "latency, dense and realized in the same process under the same runtime, at the throughput batch, on the "
        "device named beside it: the fastest of the run's latency entries there (runtimes eager, compile, "
        "onnxruntime; realizations compacted, auto, csr, 2:4), named beside it unless it is a compacted or dense "
        "model under eager (auto: per layer the faster of dense and CSR by a timed calibration; \"auto: all "
        "dense\": no layer won, the masked model ran dense); the fastest of several noisy entries leans high, the "
        "run page lists them all; \"k of n seeds timed\": only those seeds have an entry; not realizable: no "
        "realizer ran. Only runs that met their target within the tolerance in their record count. "
        "mechanism: acted (the method's defining mechanism acted in every seed, by the thresholds it declares), "
        "control (its null control: the mechanism switched off, all else equal), signal control (the mechanism run "
        "with its informative signal replaced by noise), – (a baseline); a run whose "
        "mechanism did not act is left out of the means. " + DIFFERENCES_NOTE + " " + RANK_NOTE + " "
        "seeds needed: seeds a paired t-test would need to resolve 1 point against the best-mean row at 80 % power, "
        "from the observed spread of the per-seed differences."
        + ("" if "cost" not in table.columns else
           " cost (equal-cost view): rows grouped by total training cost (method + fine-tune, plus the dense "
           f"pretrain for methods that start from it), within {100 * agg.attrs.get('cost_tolerance', 0.15):g} % of the "
           "group's cheapest row; ranks and Δ baseline are within a group.")
        + (" " + PUBLISHED_NOTE if "published" in table.columns else ""),
        "",
    ]
    starved = agg[agg["starved"].fillna(0) > 0] if "starved" in agg.columns else agg.iloc[:0]
    if not starved.empty:
        rows = "; ".join(f"{r.method} on {r.model}/{r.dataset} at {_target_text(r)} ({int(r.starved)} of {int(r.seeds)} "
                         f"seeds)" for r in starved.itertuples())
        lines += [f"Starved runs (a training stage waited for data more than {100 * STARVED_WAIT:g} % of its step "
                  f"time; their throughput and wall time are the loader's, not the device's): {rows}.", ""]
    return "\n".join(lines)


def _target_text(row) -> str:
    if row.target_kind == "none" or row.target != row.target:
        return "no target"
    return f"{row.target_kind}={row.target:g}"
