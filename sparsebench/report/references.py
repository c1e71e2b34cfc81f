"""Published numbers beside ours: `benchmarks/references.yaml`, matched to leaderboard rows.

A reference is one result as a paper or an official repository published it (top-1, FLOPs,
its source). It matches a leaderboard row when the method is the same and the row's method
arguments (its label's, over the method's defaults) agree with every argument the reference
names, and the model, dataset and target are the same; a null model or target in a reference
(the source names none) matches any. The leaderboard then shows `published` (the published
top-1, or the source's relative claim) and `Δ published` (our mean top-1 − the published one).
Published numbers never enter means or ranks (measurement spec §4.8): they are labelled anchors.

The file is read from `$SPARSEBENCH_REFERENCES`, else from the repository's
`benchmarks/references.yaml` when the package runs from a checkout; without one, no row
matches and the leaderboards carry no published columns.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import pandas as pd
import yaml

from sparsebench.report.stats import as_float
from sparsebench.specs import SpecError, Target

ENV = "SPARSEBENCH_REFERENCES"
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "references.yaml"
FIELDS = ("method", "args", "model", "dataset", "target", "top1", "top5", "gmacs", "flops_ratio", "source",
          "reconstruction", "match")
OPTIONAL = ("claim",)


@dataclass(frozen=True)
class Reference:
    method: str
    args: Dict[str, Any]
    model: Optional[str]
    dataset: str
    target: Optional[Target]
    top1: Optional[float]
    top5: Optional[float]
    gmacs: Optional[float]
    flops_ratio: Optional[float]
    source: str
    reconstruction: bool
    match: Optional[str] = None
    claim: Optional[str] = None

    @property
    def cell(self) -> str:
        """The leaderboard's `published` cell: the top-1, or the claim; † for a reconstruction."""
        text = f"{self.top1:.2f}" if self.top1 is not None else f"({self.claim})"
        return text + (" †" if self.reconstruction else "")

    def matches(self, method: str, args: Dict[str, Any], model: str, dataset: str, target: Target) -> bool:
        if method != self.method or dataset != self.dataset or (self.model is not None and model != self.model):
            return False
        if self.target is not None and not same_target(self.target, target):
            return False
        return all(k in args and same_value(v, args[k]) for k, v in self.args.items())


def same_target(a: Target, b: Target) -> bool:
    if a.kind != b.kind:
        return False
    return a.kind == "none" or math.isclose(float(a.value), float(b.value), abs_tol=1e-9)


def same_value(a: Any, b: Any) -> bool:
    """YAML and label values compared as numbers where both are, else as lower-case text."""
    try:
        return math.isclose(float(a), float(b), abs_tol=1e-12) and not isinstance(a, bool) and not isinstance(b, bool)
    except (TypeError, ValueError):
        return str(a).strip().lower() == str(b).strip().lower()


def parse_entry(raw: Any, where: str) -> Reference:
    """One entry, or a one-line SpecError naming the missing or bad field."""
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a mapping of {', '.join(FIELDS)}, got {raw!r}")
    missing = [f for f in FIELDS if f not in raw]
    if missing:
        raise SpecError(f"{where} ({raw.get('method', '?')}): missing field {missing[0]!r}; every entry needs "
                        f"{', '.join(FIELDS)} (null where the source states nothing)")
    unknown = sorted(set(raw) - set(FIELDS) - set(OPTIONAL))
    if unknown:
        raise SpecError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(FIELDS + OPTIONAL)}")
    if not isinstance(raw["source"], str) or not raw["source"].strip():
        raise SpecError(f"{where} ({raw['method']}): 'source' must name the paper table, figure or README")
    if raw["top1"] is None and not raw.get("claim"):
        raise SpecError(f"{where} ({raw['method']}): top1 is null and no 'claim' says what the source published")
    for key in ("top1", "top5", "gmacs", "flops_ratio"):
        if raw[key] is not None and (isinstance(raw[key], bool) or not isinstance(raw[key], (int, float))):
            raise SpecError(f"{where} ({raw['method']}): {key}={raw[key]!r}; allowed: a number or null")
    if not isinstance(raw["reconstruction"], bool):
        raise SpecError(f"{where} ({raw['method']}): reconstruction={raw['reconstruction']!r}; allowed: true, false")
    args = raw["args"] or {}
    if not isinstance(args, dict):
        raise SpecError(f"{where} ({raw['method']}): args must be a mapping, got {args!r}")
    target = None if raw["target"] is None else Target.parse(str(raw["target"]))
    return Reference(method=str(raw["method"]), args=dict(args), model=raw["model"], dataset=str(raw["dataset"]),
                     target=target, top1=raw["top1"], top5=raw["top5"], gmacs=raw["gmacs"],
                     flops_ratio=raw["flops_ratio"], source=raw["source"], reconstruction=raw["reconstruction"],
                     match=raw["match"], claim=raw.get("claim"))


def load_references(path: Optional[Path] = None) -> List[Reference]:
    """The references of `path` (default: $SPARSEBENCH_REFERENCES, else the checkout's file; none if absent)."""
    if path is None:
        env = os.environ.get(ENV)
        path = Path(env) if env else DEFAULT_PATH
        if not env and not path.is_file():
            return []
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"references file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise SpecError(f"references file {str(path)!r} is not valid YAML") from None
    entries = raw.get("references") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise SpecError(f"references file {str(path)!r} must hold a list under 'references'")
    return [parse_entry(e, f"{path.name} entry {i + 1}") for i, e in enumerate(entries)]


def label_args(label: str) -> tuple:
    """(method name, {arg: value}) of a leaderboard label, e.g. `gap-cyclic[distribution=erk] (4× compute)`,
    over the method's defaults, so a reference naming a default value matches a label that omits it."""
    from sparsebench.methods.base import METHODS, build_config, config_dict

    name, _, rest = label.split(" ", 1)[0].partition("[")
    args: Dict[str, Any] = {}
    try:
        args.update(config_dict(build_config(METHODS.get(name).factory, {})))
    except Exception:            # noqa: BLE001 -- a method no longer installed: the label's values alone
        pass
    for item in rest.rstrip("]").split(",") if rest else []:
        key, _, value = item.partition("=")
        args[key] = yaml.safe_load(value) if value else value
    return name, args


def reference_for(references: Iterable[Reference], label: str, model: str, dataset: str,
                  target_kind: str, target_value) -> Optional[Reference]:
    """The first reference matching this row; one with a published top-1 before a relative claim."""
    name, args = label_args(label)
    value = None if target_kind == "none" or target_value is None or pd.isna(target_value) else float(target_value)
    target = Target() if value is None else Target(target_kind, value)
    found = [r for r in references if r.matches(name, args, model, dataset, target)]
    found.sort(key=lambda r: r.top1 is None)
    return found[0] if found else None


def published_columns(rows: pd.DataFrame, references: Optional[List[Reference]] = None) -> pd.DataFrame:
    """`published`, `Δ published` and `published source` for each row of `rows` (columns dataset, model,
    method, target_kind, target, top1); empty cells where no reference matches. None of them when no
    row matches any reference."""
    references = load_references() if references is None else references
    if rows.empty or not references:
        return pd.DataFrame(index=rows.index)
    published, delta, source = [], [], []
    for _, r in rows.iterrows():
        ref = reference_for(references, r["method"], r["model"], r["dataset"], r["target_kind"], r["target"])
        ours = as_float(r.get("top1"))
        published.append("" if ref is None else ref.cell)
        delta.append("" if ref is None or ref.top1 is None or ours is None else f"{ours - ref.top1:+.2f}")
        source.append("" if ref is None else ref.source)
    if not any(published):
        return pd.DataFrame(index=rows.index)
    return pd.DataFrame({"published": published, "Δ published": delta, "published source": source}, index=rows.index)


def with_published(table: pd.DataFrame, agg: pd.DataFrame, references: Optional[List[Reference]] = None) -> pd.DataFrame:
    """The leaderboard's display table with `published` and `Δ published` after `top1 (%)`, when any row
    matches a reference (`agg`: the aggregated rows the display table was built from, same order)."""
    extra = published_columns(agg, references)
    if extra.empty or "top1 (%)" not in table.columns:
        return table
    out = table.copy()
    at = list(out.columns).index("top1 (%)") + 1
    out.insert(at, "published", list(extra["published"]))
    out.insert(at + 1, "Δ published", list(extra["Δ published"]))
    return out


NOTE = ("published: top-1 (%) as the source in benchmarks/references.yaml published it for the same method, "
        "arguments, model, dataset and target (its own budget and recipe; never averaged or ranked), or the "
        "source's relative claim in parentheses; † the adapter is a reconstruction (no public code). "
        "Δ published: our mean top-1 − the published top-1.")


def published_html(summary: pd.DataFrame, references: Optional[List[Reference]] = None) -> str:
    """The report's "Published numbers beside ours" section: one row per matching leaderboard row
    (dataset, model, method, target, our top-1, published, Δ published, source); "" when none matches."""
    import html

    if summary.empty:
        return ""
    ok = summary[summary["status"] == "ok"] if "status" in summary.columns else summary
    extra = published_columns(ok, references)
    if extra.empty:
        return ""
    lines = []
    for index, r in ok.iterrows():
        if not extra.at[index, "published"]:
            continue
        target = "dense" if r["target_kind"] == "none" else f"{r['target_kind']}={float(r['target']):g}"
        ours = as_float(r.get("top1"))
        cells = [r["dataset"], r["model"], r["method"], target, "–" if ours is None else f"{ours:.2f}",
                 extra.at[index, "published"], extra.at[index, "Δ published"] or "–", extra.at[index, "published source"]]
        lines.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("dataset", "model", "method", "target", "top1 (%)", "published",
                                             "Δ published", "source"))
    return (f'<h2 id="published">Published numbers beside ours</h2><p class="note">{html.escape(NOTE)}</p>'
            f'<div class="scroll"><table class="published"><thead><tr>{head}</tr></thead><tbody>'
            + "\n".join(lines) + "</tbody></table></div>")
