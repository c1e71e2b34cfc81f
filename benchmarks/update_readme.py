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
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pandas as pd

from sparsebench.report import speedup
from sparsebench.report.leaderboard import Leaderboard, display_table
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


def quick_leaderboard(root: Path) -> str:
    """The quick suite's leaderboard in the README's few columns, one table per (model, dataset):
    the rows and cells of results/quick/leaderboard.md, which has every column and the notes."""
    table = display_table(Leaderboard.of(load_records(root / "results" / "quick")).table)
    parts = []
    for (model, dataset), part in table.groupby(["model", "dataset"], sort=False):
        parts += [f"### {model} on {dataset}", "", part[QUICK_COLUMNS].to_markdown(index=False), ""]
    return "\n".join(parts)


EVIDENCE_COLUMNS = ["target", "rank", "method", "top1 (%)", "Δ control", "Δ signal", "Δ baseline", "FLOPs ratio",
                    "measured speedup", "mechanism", "verdict", "seeds"]
EVIDENCE_SUITES = ("gap", "svite", "ofb", "pass", "pass-aggressive")


EVIDENCE_KEY = ("Δ control, Δ signal, Δ baseline: mean ± 95 % interval over seeds and test images (‡: seed-level "
                "only), n pairs, the t-test's p, its Holm adjustment over every Δ control, Δ signal and Δ baseline test "
                "of the model's table, and the exact sign-flip p. verdict: the controls the row beat (a positive "
                "difference, Holm p < 0.05). rank: 1 + the rows significantly better (every pair of rows, "
                "Holm-corrected); \"=\": a shared rank. Full notes: [protocol.md](protocol.md#the-leaderboards-columns).")


def evidence_board(root: Path, suite: str, equal_cost: str = None):
    """(records, planned count, Leaderboard) of one evidence suite: only the runs its file plans."""
    planned = {resolve(s).hash for s in load_suite(root / "benchmarks" / "evidence" / f"{suite}.yaml").specs}
    records = [r for r in load_records(root / "results" / "evidence") if r.spec_hash in planned]
    return records, len(planned), Leaderboard.of(records, equal_cost=equal_cost)


def short_labels(labels: List[str]) -> Dict[str, str]:
    """Each label without the arguments every label of its method shares (`svite[include_head=False]`
    on every SViTE row says nothing): what tells the rows of one method apart."""
    def parts(label):
        name, _, rest = label.partition("[")
        return name, (rest.rstrip("]").split(",") if rest else [])
    by_method: Dict[str, List[List[str]]] = {}
    for label in labels:
        name, args = parts(label)
        by_method.setdefault(name, []).append(args)
    shared = {name: set.intersection(*map(set, seen)) for name, seen in by_method.items()}
    out = {}
    for label in labels:
        name, args = parts(label)
        kept = [a for a in args if a not in shared[name]]
        out[label] = name + (f"[{','.join(kept)}]" if kept else "")
    return out


def _difference(delta, p_holm) -> str:
    if delta is None or pd.isna(delta):
        return "not run"
    return f"{delta:+.2f} (p {p_holm:.2f})" if not pd.isna(p_holm) else f"{delta:+.2f} (one seed: no test)"


def evidence_verdicts(root: Path) -> str:
    """Per seed-method row of the evidence suites (every row with a null or a signal control, the
    controls themselves left out): its difference to each control and the verdict, Holm-adjusted
    across every test this table shows (so the section's verdicts hold together at 95 %)."""
    rows = []
    for suite in EVIDENCE_SUITES:
        _, _, board = evidence_board(root, suite)
        table = board.table
        if table.empty:
            continue
        signals = set(table["signal"].dropna())
        for _, r in table.iterrows():
            if r["mechanism"] != "acted" or r["method"] in signals or (r["control_pairs"] == 0 and pd.isna(r["signal"])):
                continue
            rows.append({"suite": suite, "model": r["model"], "target": f"{r['target_kind']}={r['target']:g}",
                         "method": r["method"], "control_delta": r["control_delta"], "control_p": r["control_p"],
                         "signal_delta": r["signal_delta"], "signal_p": r["signal_p"], "signal": r["signal"]})
    seen, unique = set(), []
    for row in rows:                      # a row two suites share is tested once
        key = (row["model"], row["target"], row["method"])
        if key not in seen:
            seen.add(key)
            unique.append(row)
    tests = [(i, kind) for i, row in enumerate(unique) for kind in ("control", "signal")
             if not pd.isna(row[f"{kind}_p"])]
    adjusted = dict(zip(tests, holm([unique[i][f"{kind}_p"] for i, kind in tests])))
    names = short_labels([row["method"] for row in unique])
    lines = ["| method | model | target | Δ null control (Holm p) | Δ signal control (Holm p) | beats |",
             "|---|---|---|---|---|---|"]
    for i, row in enumerate(unique):
        won = []
        for kind, word in (("control", "null"), ("signal", "signal")):
            p = adjusted.get((i, kind))
            if p is not None and row[f"{kind}_delta"] > 0 and p < 0.05:
                won.append(word)
        beats = " and ".join(won) if won else "neither"
        lines.append(f"| {names[row['method']]} | {row['model']} | {row['target']} "
                     f"| {_difference(row['control_delta'], adjusted.get((i, 'control'), float('nan')))} "
                     f"| {_difference(row['signal_delta'], adjusted.get((i, 'signal'), float('nan')))} | {beats} |")
    lines += ["", f"Top-1 points, 5 paired seeds; p: the two-level t-test, Holm-adjusted over the {len(tests)} tests "
                  "of this table. Labels leave out the arguments every run of the method shares; the full rows "
                  "are in [docs/evidence.md](docs/evidence.md)."]
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
    Block("README.md", "evidence-verdicts", evidence_verdicts),
    Block("docs/evidence.md", "evidence-verdicts", evidence_verdicts),
    *[Block("docs/evidence.md", f"evidence-{suite}", lambda root, suite=suite: evidence_table(root, suite))
      for suite in EVIDENCE_SUITES],
    Block("docs/evidence.md", "evidence-gap-macs", lambda root: evidence_table(root, "gap", equal_cost="macs")),
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
