"""Comparisons. `compare_frame`/`compare_text`: your records against a reference directory's
(e.g. the committed results/quick): per (dataset, model, method, target, seed), both top-1s and
both measured speedups. `compare_methods`/`compare_methods_text`: two methods of one results
directory, paired by seed at every setting both ran (`sparsebench compare`; statistics in
`report/stats.py`)."""
from __future__ import annotations

from typing import Iterable, List, Optional

import numpy as np
import pandas as pd

from sparsebench.report.runs import as_float, display_method, runs_frame
from sparsebench.report.stats import SINGLE_SEED
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


# --- two methods of one results directory ---------------------------------------------------------
SETTING = ["model", "dataset", "target_kind", "target", "device"]


class CompareError(ValueError):
    """A comparison that cannot be made (an unknown method, no setting in common); one line."""


def _target_label(kind: str, value) -> str:
    return "dense" if kind == "none" else f"{kind}={float(value):g}"


def method_runs(records: Iterable[RunRecord]) -> pd.DataFrame:
    """The runs that enter the means (`leaderboard.ranked`), one row each, with their per-sample results."""
    from sparsebench.report.leaderboard import ranked, records_frame

    df = records_frame(records)
    if df.empty:
        return df
    df = ranked(df)
    df = df.assign(target=df["target"].astype(float).fillna(-1.0))     # NaN (dense) never equals itself as a key
    return df.assign(target_label=[_target_label(k, v) for k, v in zip(df["target_kind"], df["target"])])


def resolve_label(name: str, labels: Iterable[str]) -> str:
    """A method label as the leaderboard prints it (`pass[residual_mode=coupled]`); the display form
    without the `†` arguments is accepted too when it names one label."""
    labels = sorted(set(labels))
    if name in labels:
        return name
    matches = [m for m in labels if display_method(m).replace(" †", "") == name]
    if len(matches) == 1:
        return matches[0]
    raise CompareError(f"unknown method {name!r}; allowed: {', '.join(labels) or 'none (no ranked runs)'}")


def compare_methods(records: Iterable[RunRecord], a: str, b: str, target: Optional[str] = None,
                    model: Optional[str] = None, per_sample: str = "all", runs: pd.DataFrame = None) -> List[dict]:
    """A against B (labels as the leaderboard prints them) at every (model, dataset, target, device)
    where both have ranked runs: the per-seed paired differences A − B in top-1 points, their mean,
    95 % t-interval, t and sign-flip p-values, the two-level interval and test over seeds and test
    images (`two_level`) where every run kept per-sample results, the deciding p (`p_value`) and
    its Holm adjustment over the settings printed together (`p_holm`: one family), the seeds
    needed to resolve 1 point, and per seed the exact McNemar p and bootstrap interval where both
    runs kept per-sample results (`per_sample="all"`). CompareError when a label is unknown or no
    setting is common."""
    from sparsebench.report.leaderboard import seed_runs
    from sparsebench.report.stats import _rp, compare_runs, holm

    df = method_runs(records) if runs is None else runs
    if df.empty:
        raise CompareError("no ranked runs (status ok, mechanism acted or none) to compare")
    a, b = resolve_label(a, df["method"]), resolve_label(b, df["method"])
    if a == b:
        raise CompareError(f"both methods are {a!r}; name two different methods")
    if target is not None:
        wanted = "dense" if target in ("none", "dense") else target.replace(" ", "")
        df = df[df["target_label"] == wanted]
    if model is not None:
        df = df[df["model"] == model]
    by_run = seed_runs(df, SETTING)
    out = []
    for at, part in df.groupby(SETTING, sort=True, dropna=False):
        mine, theirs = by_run.get((at, a)), by_run.get((at, b))
        if not mine or not theirs:
            continue
        c = compare_runs(mine, theirs, per_sample=per_sample)
        out.append({"model": at[0], "dataset": at[1], "target": _target_label(at[2], at[3]), "device": at[4],
                    "a": a, "b": b, "a_seeds": sorted(mine), "b_seeds": sorted(theirs),
                    "a_mean": round(float(np.mean([r.top1 for r in mine.values()])), 4),
                    "b_mean": round(float(np.mean([r.top1 for r in theirs.values()])), 4), **c.to_dict()})
    if not out:
        where = ", ".join(f"{k} {v}" for k, v in (("target", target), ("model", model)) if v)
        raise CompareError(f"no (model, dataset, target, device) where both {a!r} and {b!r} have ranked runs"
                           + (f" ({where})" if where else ""))
    tested = [r for r in out if r["p_value"] is not None]
    for r in out:
        r["p_holm"] = None
    for r, p in zip(tested, holm([r["p_value"] for r in tested])):
        r["p_holm"] = _rp(p)
    return out


def _num(v, fmt: str) -> str:
    f = as_float(v)
    return "–" if f is None else format(f, fmt)


def _p(v) -> str:
    from sparsebench.report.leaderboard import format_p

    return format_p(v)


def compare_methods_text(rows: List[dict]) -> str:
    """`sparsebench compare`'s text form: one table of settings, one of seeds."""
    a, b = rows[0]["a"], rows[0]["b"]
    settings, seeds, refused, older = [], [], [], 0
    for r in rows:
        where = {"model": r["model"], "dataset": r["dataset"], "target": r["target"]}
        both = r.get("two_level")
        low, high = (both["low"], both["high"]) if both else (r["low"], r["high"])
        interval = "–" if as_float(low) is None else f"[{low:+.2f}, {high:+.2f}]" + ("" if both or r["pairs"] < 2 else " ‡")
        settings.append({**where, "device": r["device"], "pairs": r["pairs"],
                         "A mean": _num(r["a_mean"], ".2f"), "B mean": _num(r["b_mean"], ".2f"),
                         "Δ (A − B)": _num(r["mean"], "+.2f") if r["pairs"] else "no common seed",
                         "95 % CI": interval, "p": _p(r["p_value"]) + (" ~" if r["basis"] == SINGLE_SEED else ""),
                         "p (Holm)": _p(r.get("p_holm")), "p (t, seeds)": _p(r["p_t"]),
                         "p (sign-flip)": _p(r["p_sign_flip"]),
                         "seeds for 1 pt": "–" if r["seeds_needed"] is None else r["seeds_needed"]})
        for seed, s in r["per_seed"].items():
            if "unpaired" not in s:
                seeds.append({**where, "seed": seed, "Δ": f"{s['difference']:+.2f}",
                              "bootstrap 95 % CI": f"[{s['low']:+.2f}, {s['high']:+.2f}]",
                              "McNemar p": _p(s["p_mcnemar"]), "A only / B only": f"{s['a_only']} / {s['b_only']}",
                              "test samples": s["n"]})
            elif "no per-sample results" in s["unpaired"]:
                older += 1
            else:
                refused.append(f"{r['model']} {r['dataset']} {r['target']} seed {seed}: {s['unpaired']}")
    lines = [f"## A = {a}  vs  B = {b}", "",
             "Paired by seed (same dense checkpoint, data split and test set): A − B in top-1 points.", "",
             pd.DataFrame(settings).to_markdown(index=False, disable_numparse=True), ""]
    if seeds:
        lines += ["### Per seed, sample by sample", "", pd.DataFrame(seeds).to_markdown(index=False, disable_numparse=True), ""]
    lines += [f"not paired sample by sample: {line}" for line in refused]
    if older:
        lines += [f"{older} seed pair(s) without a sample-level test: a record predates per-sample results."]
    if refused or older:
        lines += [""]
    lines += ["95 % CI: interval of the mean per-seed difference over seeds and test images (two-level: the "
              "seed-level variance plus the shared test set's sampling noise, from the per-sample results; t with "
              "n − 1 degrees of freedom; ‡: seed-level t-interval only, a run without per-sample results; none "
              "with one pair). p: the test that decides (two-level t; seed-level t without per-sample results; the "
              "sign-flip p where every seed gives the same difference; ~: one seed, exact McNemar on its per-sample "
              "results, test-set noise only, no training noise). p (Holm): Holm-adjusted over the settings above, "
              "one family. p (t, seeds): seed-level paired t-test; "
              "p (sign-flip): exact sign-flip permutation test (its smallest value is 2/2^n: 0.25 with 3 seeds). "
              "seeds for 1 pt: seeds a paired t-test needs to resolve a 1-point difference at 80 % power, from the "
              "observed spread of the per-seed differences. Per seed: exact McNemar test on the samples only one "
              "run got right, and the paired bootstrap interval of the difference (test-set noise of the two "
              "trained models, not seed-to-seed noise).", ""]
    return "\n".join(lines)


def comparison_data(runs: pd.DataFrame) -> dict:
    """Every pair of methods at every setting both ran, for the site's comparison page: the runs
    frame of `runs.runs_frame` in, {"methods", "settings", "pairs"} out. `pairs["A\\tB"]` (A < B)
    lists [setting index, pairs, mean A − B, low, high (the two-level interval over seeds and test
    images where per-sample results allow, else seed-level), p (its t-test), p (sign-flip), seeds
    needed, mean A, mean B]; the page negates it for B − A."""
    from itertools import combinations

    from sparsebench.report.leaderboard import ranked, seed_runs
    from sparsebench.report.stats import _r, _rp, compare_runs

    empty = {"methods": [], "settings": [], "pairs": {}}
    if runs.empty:
        return empty
    entered = ranked(runs)
    if entered.empty:
        return empty
    entered = entered.assign(test_top1=entered["top1"])
    setting = ["model", "dataset", "device", "target_kind", "target_label"]
    by_run = seed_runs(entered, setting)
    settings, pairs = [], {}
    for at, part in entered.groupby(setting, sort=True):
        index = len(settings)
        settings.append({"model": at[0], "dataset": at[1], "device": at[2], "target": at[4]})
        for a, b in combinations(sorted(set(part["method"])), 2):
            x, y = by_run[(at, a)], by_run[(at, b)]
            c = compare_runs(x, y, per_sample="none")
            d = c.seed_level.to_dict()
            pairs.setdefault(f"{a}\t{b}", []).append(
                [index, d["pairs"], d["mean"], _r(c.low), _r(c.high), _rp(c.p_value), d["p_sign_flip"], d["seeds_needed"],
                 round(float(np.mean([r.top1 for r in x.values()])), 4),
                 round(float(np.mean([r.top1 for r in y.values()])), 4)])
    return {"methods": sorted(set(entered["method"])), "settings": settings, "pairs": pairs}
