"""Refresh the generated blocks of the README and docs/ from `results/` (run after a sweep): the
quick-suite leaderboard (README), the evidence tables (docs/evidence.md: PASS, OFB, GaP/RigL/SET at
equal steps and at equal training MACs, the SViTE family) and the measured speedup tables
(docs/measurement.md: structured, and unstructured once its table exists).

    python benchmarks/update_readme.py              # rewrite the blocks in place
    python benchmarks/update_readme.py --check      # exit 1 naming the first file and block that is stale
    python benchmarks/update_readme.py --root DIR   # another checkout (default: this one)

A block sits between `<!-- NAME:start -->` and `<!-- NAME:end -->` lines.
"""
from __future__ import annotations

import argparse
import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pandas as pd

from sparsebench.report import speedup
from sparsebench.report.leaderboard import Leaderboard, display_table, format_p
from sparsebench.report.stats import holm
from sparsebench.runners.pipeline import resolve
from sparsebench.runners.suite import load_suite
from sparsebench.store import load_records

ROOT = Path(__file__).resolve().parents[1]


def block_pattern(name: str) -> "re.Pattern":
    return re.compile(rf"(<!-- {re.escape(name)}:start -->\n)(.*?)(<!-- {re.escape(name)}:end -->)", re.S)


def block_body(text: str, name: str) -> Optional[str]:
    """What stands between the block's markers now (None: the text has no such block)."""
    match = block_pattern(name).search(text)
    return None if match is None else match.group(2)


def replace_between(text: str, name: str, body: str, where: str = "README") -> str:
    pattern = block_pattern(name)
    if not pattern.search(text):
        raise SystemExit(f"{where} has no {name} markers")
    body = body.strip("\n")
    return pattern.sub(lambda m: m.group(1) + (body + "\n" if body else "") + m.group(3), text)


QUICK_COLUMNS = ["target", "rank", "method", "top1 (%)", "Δ dense", "FLOPs ratio", "measured speedup", "mechanism"]


def compact_markdown(df: "pd.DataFrame") -> str:
    """`to_markdown`'s pipe table (the cells exactly as the full leaderboard prints them) without its
    padding: the README stays short and renders the same."""
    def unpadded(line: str) -> str:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if all(c and set(c) <= set(":-") for c in cells):          # the alignment row: its markers only
            cells = [(":" if c.startswith(":") else "") + "---" + (":" if c.endswith(":") else "") for c in cells]
        return "| " + " | ".join(cells) + " |"
    return "\n".join(unpadded(line) for line in df.to_markdown(index=False).splitlines())


def quick_leaderboard(root: Path) -> str:
    """The quick suite's leaderboard in the README's few columns, one table per (model, dataset):
    the rows and cells of results/quick/leaderboard.md, which has every column and the notes."""
    table = display_table(Leaderboard.of(load_records(root / "results" / "quick")).table)
    parts = []
    for (model, dataset), part in table.groupby(["model", "dataset"], sort=False):
        parts += [f"### {model} on {dataset}", "", compact_markdown(part[QUICK_COLUMNS]), ""]
    return "\n".join(parts)


EVIDENCE_COLUMNS = ["target", "rank", "method", "top1 (%)", "Δ control", "Δ signal", "Δ baseline", "FLOPs ratio",
                    "measured speedup", "mechanism", "verdict", "seeds"]
EVIDENCE_SUITES = ("gap", "svite", "ofb", "pass", "pass-aggressive")


EVIDENCE_KEY = ("Δ control, Δ signal, Δ baseline: mean ± 95 % interval over seeds and test images (‡: seed-level "
                "only), n pairs, the t-test's p, its Holm adjustment over every Δ control, Δ signal and Δ baseline test "
                "of the model's table, and the exact sign-flip p. verdict: the controls the row beat (a positive "
                "difference, Holm p < 0.05). rank: 1 + the rows significantly better (every pair of rows, "
                "Holm-corrected); \"=\": a shared rank. Full notes: [protocol.md](protocol.md#the-leaderboards-columns).")


@functools.lru_cache(maxsize=None)
def evidence_board(root: Path, suite: str, equal_cost: str = None):
    """(records, planned count, Leaderboard) of one evidence suite: only the runs its file plans.
    Built once per suite and view in a process: the README's and docs' blocks all read them."""
    planned = {resolve(s).hash for s in load_suite(root / "benchmarks" / "evidence" / f"{suite}.yaml").specs}
    records = [r for r in load_records(root / "results" / "evidence") if r.spec_hash in planned]
    return records, len(planned), Leaderboard.of(records, equal_cost=equal_cost)


def split_label(label: str) -> tuple:
    """(method name, [its k=v arguments], recipe suffix or "") of a leaderboard label such as
    `pass[residual_mode=coupled] {search_epochs=6}`."""
    base, _, suffix = label.partition(" {")
    name, _, rest = base.partition("[")
    return name, (rest.rstrip("]").split(",") if rest else []), ("{" + suffix if suffix else "")


def short_labels(labels: List[str]) -> Dict[str, str]:
    """Each label without the arguments every label of its method shares (`svite[include_head=False]`
    on every SViTE row says nothing): what tells the rows of one method apart."""
    by_method: Dict[str, List[List[str]]] = {}
    for label in labels:
        name, args, _ = split_label(label)
        by_method.setdefault(name, []).append(args)
    shared = {name: set.intersection(*map(set, seen)) for name, seen in by_method.items()}
    out = {}
    for label in labels:
        name, args, suffix = split_label(label)
        kept = [a for a in args if a not in shared[name]]
        out[label] = name + (f"[{','.join(kept)}]" if kept else "") + (f" {suffix}" if suffix else "")
    return out


def is_main_row(short: str) -> bool:
    """A seed method at its defaults (the suite's shared arguments aside), under its default budget
    where a recipe suffix tells budgets apart: the rows the README shows."""
    from sparsebench.methods import METHODS

    name, args, suffix = split_label(short)
    if args:
        return False
    if not suffix:
        return True
    budget = getattr(METHODS.get(name).factory, "default_budget", {})
    return suffix == "{" + ",".join(f"{k}={v}" for k, v in sorted(budget.items())) + "}"


SEEDS = 5      # every evidence suite's seeds: a pair count is printed only where it is fewer


def _difference(delta, pairs, p_holm) -> str:
    if delta is None or pd.isna(delta):
        return "not run"
    if pd.isna(p_holm):
        return f"{delta:+.2f} (n={pairs}: no test)"
    return f"{delta:+.2f} ({'' if pairs == SEEDS else f'n={pairs}, '}p {format_p(p_holm)})"


def evidence_verdicts(root: Path, main_only: bool = False) -> str:
    """Per seed-method row of the evidence suites (every row with a null or a signal control, the
    controls themselves left out): its paired difference to its null control and to *each* of its
    signal controls (the sanity checks included), and the controls it beat, Holm-adjusted across
    every test of the full table (docs/evidence.md), so the verdicts hold together at 95 %;
    `main_only`: the rows of each method at its defaults (the README's), with the same p-values."""
    from sparsebench.methods.base import signal_control_runs
    from sparsebench.report.leaderboard import more_signal_controls, records_frame

    rows = []
    for suite in EVIDENCE_SUITES:
        records, _, board = evidence_board(root, suite)
        table = board.table
        if table.empty:
            continue
        frame = records_frame(records)
        by_id = {r.run_id: r for r in records}
        controls_of = {}                 # label → [(control name, control label)], in declared order
        for _, run in frame.iterrows():
            record = by_id[run["run_id"]]
            names = [name for name, _, _ in signal_control_runs(record.method, record.method_args)]
            controls_of.setdefault(run["method"], list(zip(names, run["signal_controls_of_row"])))
        signals = {label for pairs in controls_of.values() for _, label in pairs}
        for _, r in table.iterrows():
            pairs = controls_of.get(r["method"], [])
            if r["mechanism"] != "acted" or r["method"] in signals or (r["control_pairs"] == 0 and not pairs):
                continue
            # the leaderboard's pairings: its first signal control, then the others that ran
            paired = {r["signal"]: (r["signal_delta"], r["signal_pairs"], r["signal_p"])} if r["signal_pairs"] else {}
            paired.update({m["label"]: (m["more_delta"], m["more_pairs"], m["more_p"]) for m in more_signal_controls(r)})
            tests = [("null control", r["control_delta"], r["control_pairs"], r["control_p"])]
            tests += [(name, *paired.get(label, (None, 0, None))) for name, label in pairs]
            rows.append({"model": r["model"], "target": f"{r['target_kind']}={r['target']:g}", "method": r["method"],
                         "tests": tests})
    seen, unique = set(), []
    for row in rows:                      # a row two suites share is tested once
        key = (row["model"], row["target"], row["method"])
        if key not in seen:
            seen.add(key)
            unique.append(row)
    tested = [(i, j) for i, row in enumerate(unique) for j, t in enumerate(row["tests"])
              if t[3] is not None and not pd.isna(t[3])]
    adjusted = dict(zip(tested, holm([unique[i]["tests"][j][3] for i, j in tested])))
    names = short_labels([row["method"] for row in unique])
    lines = ["| method | model | target | Δ null control (Holm p) | Δ signal controls (Holm p) | beats |",
             "|---|---|---|---|---|---|"]
    for i, row in enumerate(unique):
        name = names[row["method"]]
        if main_only and not is_main_row(name):
            continue
        won, below, cells = [], [], []
        for j, (control, delta, pairs, _) in enumerate(row["tests"]):
            p = adjusted.get((i, j))
            cell = _difference(delta, pairs, float("nan") if p is None else p)
            if j == 0 or delta is not None:                  # a signal control not run is left out
                cells.append(cell if j == 0 else f"{control} {cell}")
            if p is not None and p < 0.05:
                (won if delta > 0 else below).append(control)
        beats = (", ".join(won) if won else "neither") + (f"; below {', '.join(below)}" if below else "")
        signal = "<br>".join(cells[1:]) or "–"
        lines.append(f"| {split_label(name)[0] if main_only else name} | {row['model']} | {row['target']} "
                     f"| {cells[0]} | {signal} | {beats} |")
    where = ("the full table in [docs/evidence.md](docs/evidence.md), which adds the ablations and diagnostic rows"
             if main_only else "this table")
    lines += ["", f"Top-1 points, method − control, over {SEEDS} paired seeds unless n says fewer; p: the two-level "
                  "t-test, Holm-adjusted over the "
                  f"{len(tested)} tests of {where}. Signal controls: the mechanism run with its informative signal "
                  "replaced by noise, and for methods that prune a trained model the sanity checks (layer-shuffled "
                  "masks, the re-initialised structure); those not run are left out. Labels leave out the arguments "
                  "every run of the method shares."]
    return "\n".join(lines)


def evidence_table(root: Path, suite: str, equal_cost: str = None) -> str:
    """The evidence suite's rows from results/evidence (only the runs the suite file plans), one
    compact table per model, and the runs left out of the means with their reasons; `equal_cost`
    ("macs"): the equal-training-MACs view, with its cost column."""
    records, planned, board = evidence_board(root, suite, equal_cost)
    table = display_table(board.table)
    columns = EVIDENCE_COLUMNS if equal_cost is None else (
        ["target", "cost", "rank", "method", "top1 (%)", "Δ baseline", "train GMACs", "mechanism", "seeds"])
    parts = [f"{len(records)} of {planned} planned runs recorded.", ""]
    for model, part in table.groupby("model", sort=False):
        parts += [f"**{model}**", "", part[columns].to_markdown(index=False), ""]
    if not board.excluded.empty:
        left = board.excluded[["target", "method", "seed", "status", "detail"]]
        parts += ["Left out of the means:", "", left.to_markdown(index=False), ""]
    parts += [EVIDENCE_KEY, ""]
    return "\n".join(parts).strip()


@dataclass(frozen=True)
class Claim:
    """A claim of a seed paper as a paired comparison: `a` beats `b` (leaderboard labels) on `model`
    at `target`. Its numbers and verdict come from the records (`claims_table`)."""
    text: str
    a: str
    b: str
    model: str
    target: str


def claims_table(root: Path, suite: str, claims: List[Claim]) -> str:
    """Each claim's paired difference A − B (5 seeds; two-level interval over seeds and test images),
    its p Holm-adjusted over the claims of this table, and the verdict: "holds" (A ahead, Holm
    p < 0.05), "contradicted" (B ahead, Holm p < 0.05), "not distinguishable", or why it was not
    tested (a side with no ranked runs: not run, or its mechanism did not act)."""
    from sparsebench.report.compare import CompareError, compare_methods, method_runs

    records, _, _ = evidence_board(root, suite)
    runs = method_runs(records)
    found = []
    for claim in claims:
        try:
            (row,) = compare_methods(records, claim.a, claim.b, target=claim.target, model=claim.model,
                                     per_sample="none", runs=runs)
        except CompareError:
            at = runs[(runs["model"] == claim.model) & (runs["target_label"] == claim.target)] if not runs.empty else runs
            have = set() if at.empty else set(at["method"])
            row = {"missing": " and ".join(f"`{label}`" for label in (claim.a, claim.b) if label not in have)
                   or "no common seed"}
        found.append(row)
    tested = [i for i, row in enumerate(found) if row.get("p_value") is not None]
    adjusted = dict(zip(tested, holm([found[i]["p_value"] for i in tested])))
    lines = ["| claim | model | target | A − B (95 % interval) | seeds | Holm p | verdict |", "|---|---|---|---|---|---|---|"]
    for i, (claim, row) in enumerate(zip(claims, found)):
        if "missing" in row:
            lines.append(f"| {claim.text} | {claim.model} | {claim.target} | – | – | – | not tested: no ranked runs of "
                         f"{row['missing']} (not run, or its mechanism did not act) |")
            continue
        both = row.get("two_level")
        low, high = (both["low"], both["high"]) if both else (row["low"], row["high"])
        p = adjusted.get(i)
        verdict = ("not distinguishable" if p is None or p >= 0.05 else "holds" if row["mean"] > 0 else "contradicted")
        interval = "" if low is None or pd.isna(low) else f" [{low:+.2f}, {high:+.2f}]"
        lines.append(f"| {claim.text} | {claim.model} | {claim.target} | {row['mean']:+.2f}{interval} "
                     f"| {row['pairs']} | {'–' if p is None else f'{p:.3f}'} | {verdict} |")
    lines += ["", f"A − B in top-1 points, paired by seed; Holm over the {len(tested)} tests of this table."]
    return "\n".join(lines)


def finished_runs(root: Path, suite: str, ranked_only: bool = False) -> list:
    """[(leaderboard label, run row, record)] of a suite's runs with a result (status "ok");
    `ranked_only`: only those the leaderboard averages (`leaderboard.ranked`: not "did not act")."""
    from sparsebench.report.leaderboard import ranked, records_frame

    records, _, _ = evidence_board(root, suite)
    frame = records_frame(records)
    if frame.empty:
        return []
    frame = ranked(frame) if ranked_only else frame[frame["status"] == "ok"]
    by_id = {r.run_id: r for r in records}
    return [(run["method"], run, by_id[run["run_id"]]) for _, run in frame.iterrows()]


def channel_widths(root: Path, suite: str) -> str:
    """The kept width of each channel group (kept/size, mean over seeds) per row of a CNN evidence
    suite, beside its mean top-1: where a method puts its channels. `residual` groups are the residual
    streams (one mask for every conv that writes the stream, coupled mode)."""
    runs = finished_runs(root, suite, ranked_only=True)
    rows: Dict[str, Dict[str, list]] = {}
    for label, run, record in runs:
        structure = record.structure or {}
        if "groups" not in structure:
            continue
        row = rows.setdefault(label, {"top1": []})
        row["top1"].append(run["test_top1"])
        for group in structure["groups"]:
            row.setdefault(group["root"], []).append(group["kept"])
    if not rows:
        return ""
    sizes = {g["root"]: g["size"] for _, _, r in runs for g in ((r.structure or {}).get("groups") or [])}
    roots = sorted(sizes, key=lambda name: (sizes[name], "downsample" in name, name))
    header = ["method", "seeds", "top1 (%)"] + [f"{name} (of {sizes[name]})" for name in roots]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in sorted(rows.items(), key=lambda kv: -sum(kv[1]["top1"]) / len(kv[1]["top1"])):
        cells = [label, str(len(row["top1"])), f"{sum(row['top1']) / len(row['top1']):.2f}"]
        cells += [f"{sum(row[name]) / len(row[name]):.1f}" if row.get(name) else "–" for name in roots]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Channel groups by their first layer: `conv1` the stem's residual stream, `layerN.0.downsample.0` "
                  "stage N's residual stream (coupled: one mask for every conv writing it), `layerN.0.conv1` the "
                  "blocks' inner widths of stage N. Runs that missed their target or did not act are left out."]
    return "\n".join(lines)


def search_signal(root: Path, suite: str) -> str:
    """What PASS's search saw, per searched row of a suite (means over seeds, min–max in brackets):
    the validation top-1 of the frozen masked network at the target (prior's and searched masks, BN
    recalibrated, no prompt), the search loss over its first and last 10 % of steps, the channels
    moved off the prior, and the top-1 after the fine-tune."""
    rows: Dict[str, Dict[str, list]] = {}
    keys = ("masked_val_top1_prior", "masked_val_top1_searched", "search_loss_first", "search_loss_last",
            "units_changed_fraction")
    for label, run, record in finished_runs(root, suite):
        metrics = (record.mechanism.metrics or {}) if record.mechanism else {}
        if record.method != "pass" or not metrics.get("search_steps"):
            continue
        row = rows.setdefault(label, {k: [] for k in (*keys, "top1", "acted")})
        for k in keys:
            row[k].append(metrics.get(k))
        row["top1"].append(run["test_top1"])
        row["acted"].append(bool(record.mechanism and record.mechanism.acted))
    if not rows:
        return ""

    def span(values, scale=1.0, digits=2):
        v = [scale * x for x in values if x is not None]
        return "–" if not v else f"{sum(v) / len(v):.{digits}f} [{min(v):.{digits}f}–{max(v):.{digits}f}]"

    lines = ["| method | runs (acted) | masked val top-1, prior (%) | masked val top-1, searched (%) | search loss first → last "
             "| channels moved | top1 after fine-tune (%) |", "|---|---|---|---|---|---|---|"]
    for label, row in sorted(rows.items(), key=lambda kv: -sum(kv[1]["top1"]) / len(kv[1]["top1"])):
        lines.append(f"| {label} | {len(row['top1'])} ({sum(row['acted'])}) | {span(row['masked_val_top1_prior'], 100, 1)} "
                     f"| {span(row['masked_val_top1_searched'], 100, 1)} | {span(row['search_loss_first'])} → "
                     f"{span(row['search_loss_last'])} | {span(row['units_changed_fraction'])} | {span(row['top1'], 1, 1)} |")
    lines += ["", "Mean [min–max] over the runs, those that did not act included. Chance is 10 % (10 classes). "
                  "Masked val: the frozen network with the row's masks at the target, BN recalibrated on the same "
                  "train batches, no prompt, before any fine-tune. Channels moved: the fraction kept by one of "
                  "the searched and the prior's selections and pruned by the other."]
    return "\n".join(lines)


CNN, VIT = "resnet20_tiny", "vit_cifar_tiny"
GAP = "gap-cyclic[distribution=erk]"
SVITE = "svite[include_head=False,include_patch_embed=False]"
PASS = "pass[residual_mode=coupled]"
CLAIMS: Dict[str, List[Claim]] = {
    "gap": [
        *[Claim("C-GaP beats RigL at equal steps", GAP, "rigl", m, "sparsity=0.9") for m in (CNN, VIT)],
        *[Claim("C-GaP beats GMP", GAP, "gmp[distribution=erk]", m, "sparsity=0.9") for m in (CNN, VIT)],
        *[Claim("RigL trained 2× beats RigL", "rigl[budget_multiplier=2.0]", "rigl", m, "sparsity=0.9") for m in (CNN, VIT)],
        *[Claim("RigL trained 2× beats GMP (≈ equal training MACs)", "rigl[budget_multiplier=2.0]", "gmp[distribution=erk]",
                m, "sparsity=0.9") for m in (CNN, VIT)],
    ],
    "svite": [
        Claim("SViTE beats RigL", SVITE, "rigl", VIT, "sparsity=0.5"),
        Claim("SViTE beats one-shot magnitude pruning", SVITE, "magnitude-global", VIT, "sparsity=0.5"),
        Claim("S²ViTE beats a dense narrower ViT", "s2vite", "dense-small", VIT, "flops=0.6"),
        Claim("S²ViTE beats L1 head/neuron pruning", "s2vite", "l1-channel", VIT, "flops=0.6"),
    ],
    "ofb": [
        *[Claim(f"OFB beats {name}", "ofb", other, VIT, t) for t in ("flops=0.5", "flops=0.3")
          for name, other in (("S²ViTE", "s2vite"), ("L1 head/neuron pruning", "l1-channel"),
                              ("a dense narrower ViT", "dense-small"))],
    ],
    "pass": [
        *[Claim(f"PASS beats {name}", PASS, other, CNN, t) for t in ("flops=0.5", "flops=0.3")
          for name, other in (("L1 pruning (global)", "l1-channel[scope=global]"), ("random channels", "random-channel"),
                              ("a dense narrower CNN", "dense-small"))],
    ],
    "pass-aggressive": [
        Claim("PASS beats random channels", f"{PASS} {{search_epochs=2}}", "random-channel", CNN, "flops=0.25"),
        Claim("PASS beats L1 pruning (global)", f"{PASS} {{search_epochs=2}}", "l1-channel[scope=global]", CNN, "flops=0.25"),
        Claim("PASS (uniform) beats random channels", "pass[residual_mode=coupled,scope=uniform]", "random-channel",
              CNN, "flops=0.25"),
        Claim("PASS (uniform) beats L1 pruning (uniform)", "pass[residual_mode=coupled,scope=uniform]", "l1-channel",
              CNN, "flops=0.25"),
        Claim("global allocation: PASS (global) beats PASS (uniform)", f"{PASS} {{search_epochs=2}}",
              "pass[residual_mode=coupled,scope=uniform]", CNN, "flops=0.25"),
        Claim("global allocation: L1 (global) beats L1 (uniform)", "l1-channel[scope=global]", "l1-channel", CNN, "flops=0.25"),
        Claim("the search: PASS beats its prior (null control)", f"{PASS} {{search_epochs=2}}",
              f"pass[residual_mode=coupled,search=False] {{search_epochs=2}}", CNN, "flops=0.25"),
        Claim("budget: a 6-epoch search beats the 2-epoch one", f"{PASS} {{search_epochs=6}}", f"{PASS} {{search_epochs=2}}",
              CNN, "flops=0.25"),
        Claim("k_min: at least 4 channels per group beats 1", "pass[min_channels=4,residual_mode=coupled]",
              f"{PASS} {{search_epochs=2}}", CNN, "flops=0.25"),
    ],
}


def structured_speedup(root: Path) -> Optional[str]:
    return speedup.speedup_summary(root / "results" / "speedup" / "cpu" / "speedup.csv")


def unstructured_speedup(root: Path) -> Optional[str]:
    """The unstructured-mask speedup table, or None (the block is left as it is) until its CSV and
    `unstructured_summary` both exist."""
    csv = root / "results" / "speedup" / "unstructured-cpu" / "speedup.csv"
    if not csv.is_file() or not hasattr(speedup, "unstructured_summary"):
        return None
    return speedup.unstructured_summary(csv)


@dataclass(frozen=True)
class Block:
    file: str                                   # relative to the root
    name: str                                   # NAME of the <!-- NAME:start/end --> markers
    make: Callable[[Path], Optional[str]]       # the block's fresh body; None: nothing to write yet


BLOCKS: List[Block] = [
    Block("README.md", "quick-leaderboard", quick_leaderboard),
    Block("README.md", "evidence-verdicts", lambda root: evidence_verdicts(root, main_only=True)),
    Block("docs/evidence.md", "evidence-verdicts", evidence_verdicts),
    *[Block("docs/evidence.md", f"evidence-{suite}", lambda root, suite=suite: evidence_table(root, suite))
      for suite in EVIDENCE_SUITES],
    Block("docs/evidence.md", "evidence-gap-macs", lambda root: evidence_table(root, "gap", equal_cost="macs")),
    *[Block("docs/evidence.md", f"claims-{suite}", lambda root, suite=suite: claims_table(root, suite, CLAIMS[suite]))
      for suite in CLAIMS],
    Block("docs/evidence.md", "pass-widths", lambda root: channel_widths(root, "pass-aggressive")),
    Block("docs/evidence.md", "pass-search-signal", lambda root: search_signal(root, "pass-aggressive")),
    Block("docs/measurement.md", "speedup-table", structured_speedup),
    Block("docs/measurement.md", "unstructured-table", unstructured_speedup),
]


def regenerate(root: Path) -> Dict[str, Dict[str, str]]:
    """{file: {"old": its text now, "new": its text with every block regenerated}}, nothing written."""
    files: Dict[str, Dict[str, str]] = {}
    for block in BLOCKS:
        if block.file not in files:
            text = (root / block.file).read_text()
            files[block.file] = {"old": text, "new": text}
        body = block.make(root)
        if body is not None:
            files[block.file]["new"] = replace_between(files[block.file]["new"], block.name, body, block.file)
    return files


def stale_blocks(root: Path) -> List[str]:
    """"FILE: block NAME" for every block whose text differs from a fresh regeneration."""
    stale = []
    files = regenerate(root)
    for block in BLOCKS:
        texts = files[block.file]
        if block_body(texts["old"], block.name) != block_body(texts["new"], block.name):
            stale.append(f"{block.file}: block {block.name}")
    return stale


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="regenerate in memory and exit 1 if a committed block differs (writes nothing)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to read and update (default: this one)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.check:
        stale = stale_blocks(root)
        if stale:
            print(f"{stale[0]} differs from a fresh regeneration"
                  + (f" (and {len(stale) - 1} more block(s): {', '.join(stale[1:])})" if len(stale) > 1 else "")
                  + "; run python benchmarks/update_readme.py", file=sys.stderr)
            return 1
        print(f"{len(BLOCKS)} generated blocks up to date")
        return 0
    for name, texts in regenerate(root).items():
        if texts["new"] != texts["old"]:
            (root / name).write_text(texts["new"])
            print(f"updated {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
