"""`sparsebench report DIR --out SITE`: a self-contained static site built from records only.

    SITE/index.html              leaderboards per (model, dataset, device): sortable, filterable
    SITE/protocol.html           what the numbers mean: budgets, splits, seeds, measurement, prunable set
    SITE/runs/<run_id>.html      one run: numbers, mechanism verdict and telemetry, training curves, spec,
                                 environment, kept structure, the command
    SITE/runs/<run_id>__curve_<stage>.svg   the run's training curve per stage (method, finetune)
    SITE/plots/*.png, *.svg      accuracy vs MACs and vs measured speedup, per (model, dataset)
    SITE/assets/site.{css,js}    copied from the package: no server, no CDN, opens from disk
"""
from __future__ import annotations

import html
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import pandas as pd

from sparsebench.report.curves import curve_stages, curve_svg
from sparsebench.report.leaderboard import (
    STARVED_WAIT, baseline_cell, controls_verdict, paired_cell, plus_minus, signal_cell, starved_stages,
)
from sparsebench.report.references import published_html
from sparsebench.report.runs import (
    FAMILIES, as_float, display_method, kept_structure, reproduce_command, run_details, runs_frame, summarize,
)
from sparsebench.store.record import RunRecord, meets_threshold, threshold_bound
from sparsebench.store.records import atomic_write_bytes, atomic_write_text

STATUS_HELP = {"ok": "met its target within the recorded tolerance", "missed_target": "achieved value outside the "
               "tolerance: listed, not ranked", "diverged": "non-finite loss or weights: no result",
               "failed": "the run raised an error: no result",
               "did_not_act": "met its target, but its record shows the method's defining mechanism did not act: "
                              "the number is its starting point's, not the method's; listed, not ranked"}
STATUSES = ("ok", "missed_target", "diverged", "failed", "did_not_act")
MECHANISM_HELP = {"acted": "the method's defining mechanism acted in every seed, by the thresholds it declares",
                  "control": "null control: the method with its mechanism switched off, all else equal",
                  "signal control": "signal control: the mechanism run with its informative signal replaced by "
                                    "noise, all else equal",
                  "–": "a baseline: no mechanism beyond its criterion", "mixed": "the seeds' verdicts differ",
                  "not recorded": "records without a mechanism verdict (before schema 3)",
                  "did not act": "the mechanism did not act (thresholds in the record)"}


def esc(v) -> str:
    return html.escape("" if v is None else str(v))


def slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "__".join(parts)).strip("_")


def _fmt(v, fmt: str, suffix: str = "") -> str:
    f = as_float(v)
    return "–" if f is None else format(f, fmt) + suffix


def _page(title: str, body: str, depth: int = 0) -> str:
    up = "../" * depth
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<link rel="stylesheet" href="{up}assets/site.css">
<script src="{up}assets/site.js" defer></script>
</head><body>
<header><h1>{esc(title)}</h1>
<nav><a href="{up}index.html">Leaderboard</a><a href="{up}index.html#plots">Plots</a><a href="{up}compare.html">Compare</a><a href="{up}protocol.html">Protocol</a></nav>
</header>
{body}
<footer><p class="note">Built by <code>sparsebench report</code> from run records only.</p></footer>
</body></html>
"""


# --- front page ---------------------------------------------------------------------------------
COLUMNS = [  # (header, data-type, css class, title)
    ("rank", "num", "text", "1 + rows significantly better at 95 % (all pairs of rows, paired over seeds and test "
                            "images, Holm-corrected); 2=: a shared rank; 1~: decided on one seed's test samples "
                            "(test-set noise only); unpaired: compared with no row, no rank"),
    ("method", "text", "text", "method name, with the arguments that differ from its defaults"),
    ("target", "text", "text", "sparsity=S: fraction of prunable weights zero; flops=F: MACs kept"),
    ("sparsity", "num", "", "achieved sparsity of the prunable weights"),
    ("FLOPs ratio", "num", "", "achieved realized MACs / dense MACs"),
    ("top-1 (%)", "num", "", "test top-1, mean ± 95 % t-interval over seeds"),
    ("top-5 (%)", "num", "", "test top-5 (datasets with more than 10 classes)"),
    ("Δ dense", "num", "", "top-1 minus the shared dense checkpoint's"),
    ("mechanism", "text", "text", "acted: the defining mechanism acted in every seed; control: the method with it "
                                  "switched off; –: a baseline; not recorded: an older record"),
    ("Δ control", "num", "", "paired top-1 difference to the method's null control at this setting, mean ± 95 % "
                             "t-interval over the seeds both have (n pairs)"),
    ("Δ signal", "num", "", "paired top-1 difference to the method's signal control (its mechanism run with the "
                            "informative signal replaced by noise), mean ± 95 % interval (n pairs); – where none ran"),
    ("verdict", "text", "text", "which controls the row beat (positive difference, Holm p < 0.05)"),
    ("Δ baseline", "num", "", "paired top-1 difference to the strongest baseline at this target (best-mean row "
                              "without a mechanism, dense excluded), mean ± 95 % t-interval (n pairs)"),
    ("seeds needed", "num", "", "seeds a paired t-test would need to resolve 1 point against the best row at 80 % "
                                "power, from the observed spread of the per-seed differences"),
    ("params", "num", "", "non-zero parameters"),
    ("MMACs", "num", "", "MACs per image, millions (theoretical for masked runs)"),
    ("theor. speedup", "num", "", "dense MACs / realized MACs"),
    ("measured speedup", "num", "", "dense / realized latency at the throughput batch, with its 95 % interval "
                                     "and the sparse-kernel realization that ran (auto, csr, 2:4)"),
    ("realizable", "text", "text", "a realizer ran on this device: a smaller dense model, 2:4 kernels, or "
                                   "auto's per-layer choice of dense and CSR kernels"),
    ("method steps", "num", "", "optimizer steps the method spent (search or sparse training)"),
    ("method s", "num", "", "method wall time, seconds"),
    ("fine-tune steps", "num", "", "the shared fine-tune's optimizer steps"),
    ("status", "text", "text", "ok / missed_target / diverged / failed / did_not_act"),
    ("seeds", "num", "", "seeds averaged"),
    ("runs", None, "text", "one page per run"),
]


def _layer_choices(layers: list) -> str:
    """The auto/csr realizer's choice per layer: kernel, density, and both calibration timings."""
    def one(e: dict) -> str:
        timed = "" if e.get("dense_ms") is None else \
            f", dense {e['dense_ms']:.3g} ms, CSR {e['csr_ms']:.3g} ms"
        why = f" ({e['reason']})" if e.get("reason") else ""
        return f"{e['layer']} {tuple(e['shape'])}: {e['kernel']}, density {e['density']:.3f}{timed}{why}"
    return "; ".join(one(e) for e in layers)


def _row(r: pd.Series) -> str:
    speed = "not realizable" if r["realizable"] is False else "–"
    speed_sort = ""
    if as_float(r["measured_speedup"]) is not None:
        speed = f"{r['measured_speedup']:.2f}×"
        speed_sort = f"{r['measured_speedup']:.6g}"
        if as_float(r["speedup_lo"]) is not None and as_float(r["speedup_hi"]) is not None:
            speed += f" [{r['speedup_lo']:.2f}–{r['speedup_hi']:.2f}]"
        if isinstance(r.get("realization"), str):
            speed += f" ({r['realization']})"
    realizable = {True: "yes", False: "no"}.get(r["realizable"], "–")
    links = " ".join(f'<a href="runs/{esc(slug(rid))}.html">{esc(_seed_of(rid))}</a>' for rid in r["run_ids"])
    mechanism = r.get("mechanism") or "not recorded"
    pairs = int(as_float(r.get("control_pairs")) or 0)
    control = paired_cell(r, "control")
    rank = r.get("rank") if isinstance(r.get("rank"), str) else ""
    base_pairs = int(as_float(r.get("baseline_pairs")) or 0)
    baseline = baseline_cell(r, display_method)
    detail = r["errors"] or (r.get("mechanism_reasons") if r["status"] == "did_not_act" else "")
    cells = [
        (f'<span title="{esc(_rank_title(r))}">{esc(rank)}</span>' if rank else "–",
         rank_sort(rank, r["top1"]) if rank else None),
        (f'<span title="{esc(r["method"])}">{esc(display_method(r["method"]))}</span>', r["method"]),
        (r["target_label"], _target_sort(r)),
        (_fmt(r["sparsity"], ".3f"), r["sparsity"]), (_fmt(r["flops"], ".3f"), r["flops"]),
        (plus_minus(r["top1"], r["top1_ci"], ".2f"), r["top1"]), (plus_minus(r["top5"], r["top5_ci"], ".2f"), r["top5"]),
        (_fmt(r["delta"], "+.2f"), r["delta"]),
        (f'<span title="{esc(MECHANISM_HELP.get(mechanism, ""))}">{esc(mechanism)}</span>', mechanism),
        (control, r["control_delta"] if pairs else None),
        (signal_cell(r, display_method), r["signal_delta"] if int(as_float(r.get("signal_pairs")) or 0) else None),
        (controls_verdict(r), controls_verdict(r)),
        (baseline, r["baseline_delta"] if base_pairs else None),
        (_fmt(r.get("seeds_needed"), ".0f"), r.get("seeds_needed")),
        (_fmt(as_float(r["params"]) and r["params"] / 1e3, ".1f", "k"), r["params"]),
        (_fmt(as_float(r["macs"]) and r["macs"] / 1e6, ".3f"), r["macs"]),
        (_fmt(r["theoretical_speedup"], ".2f", "×"), r["theoretical_speedup"]), (speed, speed_sort),
        (realizable, realizable), (_fmt(r["method_steps"], ".0f"), r["method_steps"]),
        (_fmt(r["method_seconds"], ".1f"), r["method_seconds"]), (_fmt(r["finetune_steps"], ".0f"), r["finetune_steps"]),
        (f'<span class="status-{esc(r["status"])}" title="{esc(STATUS_HELP.get(r["status"], ""))}">'
         f'{esc(r["status"])}</span>' + (f' <small>{esc(detail)}</small>' if detail else ""), r["status"]),
        (str(r["seeds"]), r["seeds"]), (links, None),
    ]
    tds = []
    for (text, sort), (_, _, cls, _) in zip(cells, COLUMNS):
        sort_attr = "" if sort is None or as_float(sort) is None and not isinstance(sort, str) else \
            f' data-sort="{esc(sort if isinstance(sort, str) else format(float(sort), ".9g"))}"'
        content = text if text.startswith("<") or "<a " in text else esc(text)
        tds.append(f'<td class="{cls}"{sort_attr}>{content}</td>')
    dense = ' class="dense"' if r["target_kind"] == "none" else ""
    return (f'<tr{dense} data-method="{esc(r["method"])}" data-target="{esc(r["target_label"])}" '
            f'data-status="{esc(r["status"])}">' + "".join(tds) + "</tr>")


def _rank_title(r) -> str:
    """How the row was compared with the best-mean row, and the Holm-adjusted p-value."""
    p = as_float(r.get("rank_p"))
    return (r.get("rank_basis") or "") + ("" if p is None else f"; Holm-adjusted p against the best-mean row = {p:.3g}")


def rank_sort(rank: str, top1) -> str:
    """Sort key of a rank cell: its number ("2=", "1~", "3 (partly unpaired)"; "unpaired" after every
    rank), then the mean, so rows of one rank keep their order."""
    number = re.match(r"\d+", rank)
    group = int(number.group()) if number else 10 ** 6
    return f"{group + (1 - (as_float(top1) or 0) / 1000):.6f}"


def _seed_of(run_id: str) -> str:
    m = re.search(r"__s(\d+)__", run_id)
    return f"s{m.group(1)}" if m else run_id


def _target_sort(r) -> str:
    kind = {"none": 0, "sparsity": 1, "flops": 2}.get(r["target_kind"], 3)
    value = as_float(r["target"]) or 0.0
    return f"{kind}:{value:.4f}"


def _select(name: str, values: Iterable[str]) -> str:
    text = display_method if name == "method" else str
    options = "".join(f'<option value="{esc(v)}">{esc(text(v))}</option>' for v in values)
    return (f'<label>{esc(name)} <select data-filter="{esc(name)}" id="filter-{esc(name)}">'
            f'<option value="">all</option>{options}</select></label>')


def _index(summary: pd.DataFrame, plots: Dict[tuple, Dict[str, str]], n_records: int, title: str,
           svg: bool = True) -> str:
    parts = [f'<p class="note">{n_records} run records. Each table is one (model, dataset, device): latencies of '
             'different devices are never averaged together. Click a column header to sort; choose a method, target '
             'or status to filter. Top-1 is mean ± 95 % t-interval over seeds (no interval with one seed); the '
             'measured-speedup interval is the t-interval over seeds, or the run\'s bootstrap interval with one '
             'seed. Runs that missed their target, diverged or failed, and runs whose record shows that the '
             'method\'s defining mechanism did not act (<code>did_not_act</code>: their number is their starting '
             'point\'s, not the method\'s), are listed apart under each table with their status and reason, never '
             'ranked. <i>mechanism</i> says whether the method\'s mechanism acted in every seed, or the row is a '
             'null control (the mechanism switched off); <i>Δ control</i> is a row\'s paired top-1 difference to '
             'its null control, with its 95 % interval over seeds and test images, p, Holm-adjusted p and exact '
             'sign-flip p. <i>rank</i>: 1 + the rows significantly better at 95 % (every pair compared, '
             'Holm-corrected), <code>2=</code> for a shared rank, <code>1~</code> for a rank that rests on one '
             'seed\'s test samples (test-set noise only) and <code>unpaired</code> for a row compared with no other; '
             '<i>Δ baseline</i>: a seed method\'s paired difference to the strongest baseline at '
             'the same target; any two methods side by side: <a href="compare.html">compare</a>. '
             'What the numbers mean: <a href="protocol.html">protocol</a>.</p>']
    if summary.empty:
        parts.append('<p id="empty">No run records with a result in this directory: nothing to rank yet.</p>')
        return _page(title, "\n".join(parts))
    parts.append('<div class="filters">' + _select("method", sorted(summary["method"].unique()))
                 + _select("target", sorted(summary["target_label"].unique(), key=_label_key))
                 + _select("status", [s for s in STATUSES if s in set(summary["status"])]) + "</div>")
    head = "".join(
        f'<th class="{cls}"' + (f' data-type="{typ}"' if typ else "") + f' title="{esc(tip)}">{esc(name)}</th>'
        for name, typ, cls, tip in COLUMNS)
    for i, ((dataset, model, device), part) in enumerate(summary.groupby(["dataset", "model", "device"], sort=False)):
        tid = f"board-{i}"
        parts.append(f'<h2 id="{esc(slug(model, dataset, device))}">{esc(model)} on {esc(dataset)} · {esc(device)}'
                     f'<span class="count" id="{tid}-count"></span></h2>')
        ok, left = part[part["status"] == "ok"], part[part["status"] != "ok"]
        rows = "\n".join(_row(r) for _, r in ok.iterrows())
        parts.append(f'<div class="scroll"><table class="board" id="{tid}" data-rows="{len(ok)}"><thead><tr>{head}'
                     f'</tr></thead><tbody>\n{rows}\n</tbody></table></div>')
        if not left.empty:       # never sorted among the ranked rows: a table of their own
            rows = "\n".join(_row(r) for _, r in left.iterrows())
            parts.append(f'<h3 class="left-out">Left out of the means: missed target, diverged, failed, or mechanism '
                         f'did not act<span class="count" id="{tid}-left-count"></span></h3>'
                         f'<div class="scroll"><table class="board left-out" id="{tid}-left" data-rows="{len(left)}">'
                         f'<thead><tr>{head}</tr></thead><tbody>\n{rows}\n</tbody></table></div>')
    if summary["method"].str.contains("skip_first=False|skip_last=False").any():
        parts.append('<p class="note">† pruned the input layer (first conv / patch embedding) and the classifier '
                     'too (<code>skip_first=False, skip_last=False</code>): these records predate today\'s default, '
                     'which leaves both dense. Hover a method for its full label.</p>')
    parts.append(published_html(summary))      # published numbers beside ours, where a reference matches
    parts.append('<h2 id="plots">Plots</h2><p class="note">Colour: method family ('
                 + "".join(f'<span class="swatch" style="background:{c}"></span>{esc(f)}'
                           for f, c in _family_colors().items() if f != "other")
                 + '). Hollow markers: masked runs (theoretical MACs); filled: compacted runs (real MACs). The '
                 'Pareto front is labelled by its methods; runs below the y floor are named in the panel. '
                 'Each plot is also an SVG.</p><div class="plots">')
    for (dataset, model), files in plots.items():
        for kind, name in files.items():
            if name.endswith(".png"):
                img = (f'<img src="{esc(name)}" alt="{esc(model)} on {esc(dataset)}: accuracy vs {esc(kind)}">')
                link = name[:-4] + ".svg" if svg else name
                parts.append(f'<h3>{esc(model)} on {esc(dataset)}: accuracy vs {esc(kind)}</h3>'
                             f'<a href="{esc(link)}">{img}</a>')
    parts.append("</div>")
    return _page(title, "\n".join(parts))


def _family_colors() -> Dict[str, str]:
    from sparsebench.report.plots import FAMILY_COLORS

    return FAMILY_COLORS


def _label_key(label: str):
    kind, _, value = label.partition("=")
    return ({"dense": 0, "sparsity": 1, "flops": 2}.get(kind, 3), -(as_float(value) or 0))


# --- run page -----------------------------------------------------------------------------------
def _kv(items: Dict[str, object]) -> str:
    return '<dl class="kv">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items.items()) + "</dl>"


VERDICT_HELP = {
    "acted": "the method's defining mechanism acted: every declared metric reached its bound",
    "did not act": "the method's defining mechanism did not act: its result is its starting point's, not the "
                   "method's; left out of the means",
    "control": "a null control: the method with its defining mechanism switched off, everything else equal",
    "not recorded": "no verdict in this record: it predates mechanism telemetry (schema < 3), or the run ended "
                    "before the method returned",
}
SHOWN_ITEMS = 24            # a longer list shows its first and last values and its length


def _verdict(record: RunRecord) -> str:
    m = record.mechanism
    if m is None:
        return "not recorded"
    return {"none": "baseline: no mechanism"}.get(m.label, m.label)


def _short(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        items = [_short(x) if not isinstance(x, (list, tuple, dict)) else
                 ("[" + _short(x) + "]" if isinstance(x, (list, tuple)) else json.dumps(x, default=str))
                 for x in v]
        if len(items) > SHOWN_ITEMS:
            items = items[:SHOWN_ITEMS - 4] + ["…"] + items[-3:] + [f"({len(v)} values)"]
        return ", ".join(items)
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    return "–" if v is None else str(v)


def _bound(threshold) -> Optional[tuple]:
    """(op, bound) from a record's threshold: `[op, bound]`, or a bare minimum."""
    pair = isinstance(threshold, (list, tuple)) and len(threshold) == 2
    return threshold_bound(threshold) if pair or as_float(threshold) is not None else None


def _meets(value, bound: Optional[tuple]) -> str:
    v = as_float(value) if not isinstance(value, (list, dict, bool)) else None
    if bound is None or v is None or as_float(bound[1]) is None:
        return "–" if bound is None else "not measured"
    ok = meets_threshold(v, (bound[0], float(bound[1])))
    return '<span class="meets">✓ meets</span>' if ok else '<span class="fails">✗ fails</span>'


def _metric_rows(metrics: Dict[str, object], thresholds: Dict[str, object], depth: int = 0, prefix: str = "") -> str:
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        bound = _bound(thresholds.get(name)) if depth == 0 else None
        op = {">=": "≥", "<=": "≤"}.get(bound[0], bound[0]) if bound else ""
        limit = f"{op} {_short(bound[1])}" if bound else ""
        pad = f' style="padding-left:{0.55 + 1.4 * depth:.2f}em"' if depth else ""
        if isinstance(value, dict) and depth < 2 and value:
            rows.append(f'<tr class="group"><td class="text"{pad}>{esc(key)}</td><td class="text"></td>'
                        f'<td class="text">{esc(limit)}</td><td class="text"></td></tr>')
            rows.append(_metric_rows(value, {}, depth + 1, prefix=f"{name}."))
            continue
        verdict = _meets(value, bound) if bound else ""
        rows.append(f'<tr><td class="text"{pad}>{esc(key)}</td><td class="text metric">{esc(_short(value))}</td>'
                    f'<td class="text">{esc(limit)}</td><td class="text">{verdict}</td></tr>')
    return "".join(rows)


def _mechanism_section(record: RunRecord) -> str:
    verdict = _verdict(record)
    m = record.mechanism
    cls = verdict.split(":")[0].replace(" ", "-")
    head = (f'<p id="verdict" class="verdict verdict-{esc(cls)}"><b>{esc(verdict)}</b>'
            f'{" — " + esc(m.reason) if m is not None and m.reason else ""}</p>'
            + (f'<p class="note">{esc(VERDICT_HELP[verdict])}.</p>' if verdict in VERDICT_HELP else ""))
    if m is None or not (m.metrics or m.thresholds):
        return head + ('<p class="note">No telemetry metrics in this record.</p>' if m is not None and m.declared
                       else "")
    missing = {k: None for k in m.thresholds if k not in m.metrics}       # declared but never measured
    table = ('<table class="mechanism"><thead><tr><th class="text">metric</th><th class="text">value</th>'
             '<th class="text">threshold</th><th class="text">verdict</th></tr></thead><tbody>'
             + _metric_rows({**m.metrics, **missing}, m.thresholds) + "</tbody></table>")
    return head + table


def _curve_section(record: RunRecord, files: Dict[str, str]) -> str:
    if not files:
        return '<p id="no-curve">No curve recorded (records before schema 3 have none).</p>'
    parts = []
    for stage, rel in files.items():
        c = record.curves[stage]
        n_events = len(c.get("events") or []) + int(c.get("events_dropped") or 0)
        parts.append(f'<figure class="curve"><a href="{esc(rel)}"><img src="{esc(rel)}" alt="{esc(stage)} stage: '
                     f'training loss, learning rate, validation top-1 and events against step"></a>'
                     f'<figcaption>{esc(stage)} stage: {len(c.get("step") or [])} points '
                     f'({c.get("steps_per_point") or 1} steps each), {len(c.get("val") or [])} validation points, '
                     f'{n_events} events</figcaption></figure>')
    return '<div class="curves">' + "".join(parts) + "</div>"


# (label, key in a stage's `resources` entry, format, unit)
RESOURCE_ROWS = (
    ("loader wait", "loader_wait_fraction", "percent", "of step time"),
    ("CPU, mean", "cpu_percent_mean", ".0f", "% (100 = one core)"),
    ("CPU, peak", "cpu_percent_peak", ".0f", "%"),
    ("resident memory, mean", "rss_mb_mean", ".0f", "MB"),
    ("resident memory, peak", "rss_mb_peak", ".0f", "MB"),
    ("/dev/shm, peak", "shm_mb_peak", ".0f", "MB"),
    ("GPU utilisation, mean", "gpu_util_percent_mean", ".0f", "%"),
    ("GPU memory used, peak", "gpu_mem_used_mb_peak", ".0f", "MB (every process)"),
    ("GPU tensors, peak", "gpu_peak_allocated_mb", ".0f", "MB (this run, so far)"),
    ("steps", "steps", ".0f", ""),
    ("samples", "samples", ".0f", ""),
)
def _resource_section(record: RunRecord) -> str:
    """What each training stage used of the machine (the record's `resources`), beside the curves."""
    used = record.resources
    if not used or not used.get("stages"):
        return '<p id="no-resources">No resource use recorded (records before the field have none).</p>'
    order = {"dense": 0, "method": 1, "finetune": 2}         # training order, whatever the JSON's key order
    stages = sorted(used["stages"], key=lambda s: (order.get(s, 3), s))
    head = '<th class="text">per stage</th>' + "".join(f"<th>{esc(s)}</th>" for s in stages)
    rows = []
    for label, key, fmt, unit in RESOURCE_ROWS:
        values = [used["stages"][s].get(key) for s in stages]
        if all(v is None for v in values):
            continue
        cells = "".join(f"<td>{_fmt(None if v is None else 100 * v, '.1f', '%') if fmt == 'percent' else _fmt(v, fmt)}</td>"
                        for v in values)
        rows.append(f'<tr><td class="text">{esc(label)}{f" <small>{esc(unit)}</small>" if unit else ""}</td>{cells}</tr>')
    starved = starved_stages(record)
    note = (f'<p class="note starved">Starved: the {", ".join(esc(s) for s in starved)} steps waited for data more than '
            f'{100 * STARVED_WAIT:.0f}% of their time; throughput is the loader\'s, not the device\'s.</p>'
            if starved else "")
    how = (f'sampled every {used.get("sample_seconds")} s ({esc(used.get("source"))}'
           + (f', GPU: {esc(used["gpu_source"])}' if used.get("gpu_source") else "") + ")")
    return (f'<aside class="resources" id="resources"><h3>Resource use</h3><table class="resources"><thead><tr>{head}'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table>{note}<p class="note">{how}</p></aside>')


def _latency_entries_table(record: RunRecord) -> str:
    """Every latency entry of the record (`RunRecord.latency_entries`): one row per (device, runtime,
    realization, batch), the run's own and every re-timing's, with the one the leaderboard shows marked."""
    entries = record.latency_entries()
    if not entries:
        return "<p>No latency entry (a run without a result).</p>"
    best = set()
    for device in dict.fromkeys(e["device"] for e in entries):
        chosen = record.best_latency_entry(device)
        if chosen is not None:
            best.add((device, chosen["runtime"], chosen["realization"], chosen["batch"], chosen["source"]))
    text_columns = ("device", "runtime", "realization", "status", "source")
    head = "".join(('<th class="text">' if c in text_columns else "<th>") + f"{c}</th>"
                   for c in ("device", "runtime", "realization", "batch", "dense ms", "realized ms",
                             "speedup", "95 % CI", "status", "source"))
    rows = []
    for e in entries:
        shown = (e["device"], e["runtime"], e["realization"], e["batch"], e["source"]) in best
        ci = e.get("speedup_ci95")
        kind = e["realization"] or "–"
        if e.get("sparse_layers") is not None and kind in ("auto", "csr"):
            kind += f" ({e['sparse_layers']} layers on CSR)"
        rows.append(
            ('<tr class="shown">' if shown else "<tr>") + f'<td class="text">{esc(e["device"])}</td>'
            f'<td class="text">{esc(e["runtime"])}</td><td class="text">{esc(kind)}</td>'
            f'<td>{esc(e["batch"] if e["batch"] is not None else "–")}</td><td>{_fmt(e["dense_ms"], ".3f")}</td>'
            f'<td>{_fmt(e["realized_ms"], ".3f")}</td><td>{_fmt(e["measured_speedup"], ".3f", "×")}'
            f'{" ◀" if shown else ""}</td><td>{"–" if not ci else f"{ci[0]:.3f}–{ci[1]:.3f}"}</td>'
            f'<td class="text">{esc(e["status"])}</td><td class="text">{esc(e["source"])}</td></tr>')
    return ('<p class="note">Each entry: dense and realized timed in one process under one runtime, '
            'alternating blocks. ◀ marks the entry the leaderboard shows for its device: the fastest at '
            'the throughput batch.</p><div class="scroll"><table class="entries"><thead><tr>' + head
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")


def _run_page(record: RunRecord, row: Dict[str, object], curve_files: Dict[str, str]) -> str:
    d = run_details(record)
    numbers = {
        "status": f"{row['status']} ({STATUS_HELP.get(row['status'], '')})" + (
            "; left out of the means: its mechanism did not act" if row["mechanism"] == "did not act" else ""),
        "target": row["target_label"], "tolerance": d["tolerance"] or "–",
        "achieved sparsity": _fmt(row["sparsity"], ".4f"), "achieved FLOPs ratio": _fmt(row["flops"], ".4f"),
        "test top-1 (%)": _fmt(row["top1"], ".2f"), "test top-5 (%)": _fmt(row["top5"], ".2f"),
        "dense top-1 (%)": _fmt(row["dense_top1"], ".2f"), "non-zero params": _fmt(row["params"], ".0f"),
        "MACs": f"{_fmt(row['macs'], '.0f')} ({row['macs_is'] or '–'}) of {_fmt(row['macs_dense'], '.0f')} dense",
        "theoretical speedup": _fmt(row["theoretical_speedup"], ".2f", "×"),
        "measured speedup": _fmt(row["measured_speedup"], ".3f", "×") + (
            f" [{row['speedup_lo']:.3f}–{row['speedup_hi']:.3f}]" if as_float(row["speedup_lo"]) is not None else ""),
        "realization": json.dumps({k: v for k, v in d["realization"].items() if k != "layers"})
                       if d["realization"] else "–",
        **({"per-layer kernels": _layer_choices(d["realization"]["layers"])}
           if d["realization"] and d["realization"].get("layers") else {}),
        "method cost": f"{row['method_steps']} steps of {row['method_budget_steps']} budget, "
                       f"{row['method_seconds']:.1f} s",
        "fine-tune": f"{row['finetune_steps']} steps, {row['finetune_seconds']:.1f} s",
        "dense pretrain": f"{row['pretrain_steps']} steps, {row['pretrain_seconds']:.1f} s",
        "prunable set": json.dumps(d["prunable"]) if d["prunable"] else "–",
        "created": d["created"], "schema": d["schema"],
    }
    if d["error"]:
        numbers["error"] = d["error"]
    structure = kept_structure(d["structure"])
    struct_html = ("<p>No kept structure in this record: masked runs store no per-layer masks; their sparsity is "
                   "stated over the prunable set above.</p>" if not structure else
                   '<table><thead><tr><th class="text">unit</th><th>kept</th><th>of</th></tr></thead><tbody>'
                   + "".join(f'<tr><td class="text">{esc(s["unit"])}</td><td>{esc(s["kept"])}</td>'
                             f'<td>{esc(s["of"] if s["of"] is not None else "–")}</td></tr>' for s in structure)
                   + "</tbody></table>")
    history = (d["notes"] or {}).get("prune_history")
    if history:
        struct_html += ('<h3>Sparsity schedule (from the record\'s notes)</h3><table><thead><tr><th>step</th>'
                        '<th>target</th><th>sparsity</th></tr></thead><tbody>'
                        + "".join(f'<tr><td>{h.get("step")}</td><td>{_fmt(h.get("target"), ".4f")}</td>'
                                  f'<td>{_fmt(h.get("sparsity"), ".4f")}</td></tr>' for h in history)
                        + "</tbody></table>")
    body = f"""
<p class="note">{esc(row['method'])} on {esc(row['model'])} / {esc(row['dataset'])}, {esc(row['target_label'])}, seed {row['seed']} · {esc(row['device'])}</p>
<h2>Reproduce</h2>
<pre id="command">{esc(reproduce_command(record))}</pre>
<p class="note">Same spec as this record (same hash) when run with the same sparsebench version; the dense
checkpoint is trained on first use and cached under the output directory.</p>
<h2>Numbers</h2>{_kv(numbers)}
<h2 id="mechanism">Mechanism</h2>{_mechanism_section(record)}
<h2 id="curves">Training curves and resource use</h2>
<div class="curves-resources">{_curve_section(record, curve_files)}{_resource_section(record)}</div>
<h2>Kept structure / per-layer sparsity</h2>{struct_html}
<h2>Spec</h2><pre>{esc(json.dumps(d['spec'], indent=2, sort_keys=True))}</pre>
<h2>Environment</h2>{_kv(d['environment'])}
<h2>Code version</h2>{_kv(d['code_version'])}
<h2>Data and selection</h2><pre>{esc(json.dumps({'data': d['data'], 'selection': d['selection'],
                                                  'dense_checkpoint': d['dense_checkpoint']}, indent=2, sort_keys=True))}</pre>
<h2 id="latency">Latency</h2>{_latency_entries_table(record)}
<details><summary>the run's own latency table, as recorded</summary><pre>{esc(json.dumps(d['latency'], indent=2, sort_keys=True))}</pre></details>
<h2>Notes</h2><pre>{esc(json.dumps(d['notes'], indent=2, sort_keys=True, default=str)[:20000])}</pre>
"""
    return _page(f"Run {record.run_id}", body, depth=1)


# --- comparison ---------------------------------------------------------------------------------
def _compare_page(runs: pd.DataFrame) -> str:
    from sparsebench.report.compare import comparison_data

    data = comparison_data(runs)
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    options = "".join(f'<option value="{esc(m)}">{esc(display_method(m))}</option>' for m in data["methods"])
    head = "".join(f'<th class="{cls}" title="{esc(tip)}">{esc(name)}</th>' for name, cls, tip in (
        ("model", "text", ""), ("dataset", "text", ""), ("target", "text", ""), ("device", "text", ""),
        ("pairs", "", "seeds both methods ran"), ("A mean", "", "top-1 (%) over A's seeds"),
        ("B mean", "", "top-1 (%) over B's seeds"), ("Δ (A − B)", "", "mean per-seed difference, top-1 points"),
        ("95 % CI", "", "interval of the mean difference over seeds and test images (protocol: two-level; "
                        "seed-level where a run kept no per-sample results; none with one pair)"),
        ("p (t)", "", "paired t-test of that interval"), ("p (sign-flip)", "", "exact sign-flip permutation test"),
        ("seeds needed", "", "seeds to resolve 1 point at 80 % power")))
    body = f"""
<p class="note">Pick two methods: each row is a (model, dataset, target, device) where both have ranked runs, with the
per-seed paired difference A − B in top-1 points (same seed: same dense checkpoint, data split and test set), its
95 % interval over seeds and test images (<a href="protocol.html#ties">protocol</a>), the paired t-test of that
interval and the exact sign-flip p-value, and the seeds a paired t-test would need to resolve
1 point at 80 % power. With n seeds the sign-flip p cannot fall below 2/2^n (0.25 with 3 seeds). Sample-level tests
for two runs of one seed (exact McNemar, paired bootstrap): <code>sparsebench compare DIR A B</code>.</p>
<div class="filters"><label>A <select id="compare-a">{options}</select></label>
<label>B <select id="compare-b">{options}</select></label></div>
<p id="compare-empty" class="note" hidden>These two methods share no setting.</p>
<div class="scroll"><table class="compare" id="compare-table"><thead><tr>{head}</tr></thead><tbody></tbody></table></div>
<noscript><p>The comparison view needs JavaScript (no network); the same numbers: <code>sparsebench compare DIR A B
--format json</code>.</p></noscript>
<script type="application/json" id="comparisons">{payload}</script>
"""
    return _page("Compare two methods", body)


# --- protocol -----------------------------------------------------------------------------------
def _seeds_needed_rows(summary: pd.DataFrame) -> List[List[object]]:
    """Per table: rows paired with the best, and the seeds needed against it (median and largest)."""
    if summary.empty or "seeds_needed" not in summary:
        return []
    rows = []
    ok = summary[summary["status"] == "ok"]
    for (dataset, model, device, label), part in ok.groupby(["dataset", "model", "device", "target_label"], sort=True):
        need = pd.to_numeric(part["seeds_needed"], errors="coerce").dropna()
        ties = int(part["rank"].astype(str).str.match(r"1[=~]").sum())
        seeds = int(part["seeds"].max())
        rows.append([model, dataset, label, device, len(part), seeds, ties,
                     "–" if need.empty else f"{need.median():.0f}", "–" if need.empty else f"{need.max():.0f}"])
    return rows


def _protocol(runs: pd.DataFrame, records: List[RunRecord], summary: pd.DataFrame = None) -> str:
    recipes, splits, measures, seeds, policies = {}, {}, {}, set(), {}
    for r in records:
        recipes.setdefault((r.model, r.dataset), r.spec.get("recipe", {}))
        data = r.data or {}
        splits.setdefault(r.dataset, {k: data.get(k) for k in ("n_train", "n_val", "n_test", "val_fraction",
                                                               "split_seed", "img_size", "source")})
        measures.setdefault(r.device, r.spec.get("measure", {}))
        seeds.add(r.seed)
        if r.prunable is not None:
            args = r.method_args
            policy = r.prunable.policy
            if policy == "unknown":
                policy = ("every conv/linear, input layer and classifier included (skip_first=False, "
                          "skip_last=False)" if args.get("skip_first") is False else "not recorded (schema 1)")
            policies.setdefault(policy, set()).add(r.method)

    def table(header: List[str], rows: List[List[object]]) -> str:
        return ("<table><thead><tr>" + "".join(f'<th class="text">{esc(h)}</th>' for h in header) + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f'<td class="text">{esc(c)}</td>' for c in row) + "</tr>" for row in rows)
                + "</tbody></table>")

    recipe_rows = [[m, d, rc.get("batch_size"), rc.get("pretrain_epochs"), rc.get("search_epochs"),
                    rc.get("finetune_epochs"), rc.get("optimizer"), rc.get("lr"), rc.get("finetune_lr")]
                   for (m, d), rc in sorted(recipes.items())]
    split_rows = [[d, *s.values()] for d, s in sorted(splits.items())]
    measure_rows = [[dev, m.get("batch_sizes"), m.get("threads"), m.get("rounds"), m.get("min_run_time"),
                     m.get("dtype"), m.get("compile")] for dev, m in sorted(measures.items())]
    policy_rows = [[p, ", ".join(sorted(ms))] for p, ms in sorted(policies.items())]
    body = f"""
<p class="note">What every number on the leaderboard means, and how it was obtained. The values in the tables
are read from the records of this report.</p>
<h2>Budgets</h2>
<p>For each (model, dataset, seed) one <b>dense checkpoint</b> is trained once (pretrain epochs) and cached by the
hash of what decides it; every method that starts from a trained model starts from that file, and its test accuracy
is the dense reference (Δ dense). Methods that prune a trained model get <b>search epochs</b> of optimizer steps;
methods that train sparse from scratch (and <code>dense-small</code>) get the pretrain budget, so with the shared
fine-tune nobody gets free epochs. The trainer enforces the budget; steps and wall time are recorded (method steps
and seconds on the leaderboard). Every method is then <b>fine-tuned with the same recipe and steps</b>, masks held on
weights, gradients and optimizer state.</p>
{table(["model", "dataset", "batch", "pretrain epochs", "search epochs", "fine-tune epochs", "optimizer", "lr", "fine-tune lr"], recipe_rows)}
<h2>Splits and selection</h2>
<p>A validation split is carved from train (stratified, seeded); model selection uses it only, and the test split is
evaluated <b>once</b>, at the end. Accuracy is the sum of correct over the sum of samples; top-5 is reported when
there are more than 10 classes.</p>
{table(["dataset", "train", "val", "test", "val fraction", "split seed", "image size", "source"], split_rows)}
<h2>Seeds</h2>
<p>Seeds in these records: {esc(", ".join(str(s) for s in sorted(seeds)) or "none")}. A seed pairs runs across methods:
the same dense checkpoint and the same data order. Means are over seeds with a 95 % t-interval; with one seed there
is no interval on accuracy, so read single-seed differences of a point or two as noise.</p>
<h2>Targets and status</h2>
<p><code>sparsity=S</code>: the fraction of prunable weights that are zero (unstructured methods).
<code>flops=F</code>: the fraction of dense MACs kept (structured methods; <code>flops=0.5</code> is 2× theoretical).
Each record stores the target and the achieved values and a tolerance; a run whose achieved value falls outside it is
<code>missed_target</code>, a run with a non-finite loss is <code>diverged</code>, a run that raised is <code>failed</code>.
Only <code>ok</code> runs are ranked and plotted; the others are listed with their status.</p>
<h2>Mechanism verdict and null controls</h2>
<p>A method with a defining mechanism (a search, a regrowth, a topology update) measures, during its run, the numbers
that show the mechanism acted (units moved, scores changed, weights swapped per update) and declares the bound each
must reach; the record's <b>mechanism verdict</b> is <code>acted</code> when every declared metric reaches its bound,
else <code>did not act</code>, with a one-line reason naming the number that decided it. A run whose mechanism did
not act met its target with its starting point's number, not the method's: it is listed apart
(<code>did_not_act</code>) and never enters the means. Baselines have no mechanism beyond their criterion
(<code>–</code>); records before schema 3 say <code>not recorded</code>. A method's <b>null control</b> is the same
method with the Config values that switch its mechanism off, everything else equal (same dense checkpoint, budget,
fine-tune and seeds); suites with <code>controls: true</code> run it beside the method, and <b>Δ control</b> is the
paired top-1 difference, method − control, over the seeds both have, with its 95 % interval over seeds and test
images and the number of pairs (see <a href="#ties">below</a>). Each run page shows the verdict, the telemetry beside its thresholds, and the training curves (loss, learning
rate, validation top-1 and the method's update events against step).</p>
<h2 id="ties">Paired tests, test-set noise, family-wise verdicts and ranks</h2>
<p>Runs of one seed share the dense checkpoint, the data split and the test set, so two methods pair seed by seed.
<b>Intervals over seeds and test images.</b> Every seed is scored on the same test images, so the test set's sampling
noise is shared by all seeds and does not average out over them: an interval over seeds alone leaves it out. Records
keep each test sample's correctness (keyed to the test set's identity), so the per-image differences A − B form a
crossed seeds × images array, and the variance of its mean is σ²<sub>seed</sub>/n + σ²<sub>image</sub>/m +
σ²<sub>seed×image</sub>/(n·m) (two-way random-effects model; method-of-moments estimates from the ANOVA mean squares,
clamped at zero, so never below the seed-level variance). The 95 % interval is mean ± t<sub>n−1</sub> × its square
root and p is the t-test on it. Why this model and not a bootstrap: the images are crossed with the seeds, not
nested in them, so a bootstrap that redraws images within each seed treats the test set as redrawn every seed,
and one that resamples seeds and images together counts the seed × image term more than once; with five seeds a
percentile bootstrap over seeds is also about 37 % narrower than the t-interval. The moments need no random draws:
the same records give the same interval. Where a run kept no per-sample results (older records), the interval is
the seed-level t-interval, marked ‡. <b>Sign-flip.</b> Beside the t-test, the exact sign-flip permutation p over
the 2<sup>n</sup> sign patterns of the n per-seed differences; it is never below 2/2<sup>n</sup> (0.0625 with 5
seeds), and where every seed gives the same non-zero difference (the t-test undefined) it is the p used.
<b>Family-wise verdicts.</b> Holm's correction is applied over every Δ control and Δ baseline test of one
(model, dataset, device) table, all its targets together; tables show the raw p, the Holm-adjusted p (the one a
verdict should use) and the sign-flip p. <b>rank</b>: within each (model, dataset, target, device) table every pair
of rows is compared by the test above (or, when a single seed pairs, the exact McNemar test on the test samples
only one of the two runs got right), with Holm's correction over all those comparisons; a row's rank is 1 + the
number of rows significantly better than it, rows sharing a rank are marked <code>=</code> (<code>2=</code>), and
rows are listed by rank, then mean, so the ranks only go down the table. <code>1~</code>: the rank rests on one
seed, by McNemar's test on its per-sample results: test-set noise only, no training noise, so another seed may
reverse it. <code>unpaired</code>: no row it could be compared with (no common seed, or one seed without
per-sample results), no rank; <code>(partly unpaired)</code>: ranked against the rows it pairs with only.
<b>Δ baseline</b>: a seed-method row's paired difference to the strongest baseline at the same target (the
best-mean row whose records say it has no mechanism, dense excluded). <b>Seeds needed</b>: from the standard
deviation of the per-seed differences to the best-mean row, the number of seeds at which a paired t-test would
detect a 1-point difference with 80 % power (noncentral t). The <a href="compare.html">comparison page</a> pairs any
two methods.</p>
{table(["model", "dataset", "target", "device", "rows", "seeds", "rows at rank 1",
        "seeds needed (median)", "seeds needed (largest)"], _seeds_needed_rows(summary if summary is not None else pd.DataFrame()))}
<h2>Prunable set</h2>
<p>Sparsity is stated over the prunable set: the conv and linear weights a method may touch. By default unstructured
methods leave the model card's <b>first conv (input layer) and classifier dense</b>; records say which policy they used
(older, schema-1 records predate the policy field; the quick suite's were run with
<code>skip_first=False, skip_last=False</code>, i.e. every conv/linear pruned).</p>
{table(["policy", "methods"], policy_rows)}
<h2>Measurement</h2>
<p><b>MACs</b> are counted at the dispatcher level with attention matmuls included; FLOPs = 2 × MACs. Masked runs
count non-zero weights × output positions (<i>theoretical</i>; hollow markers in the plots); compacted runs count the
smaller model (<i>real</i>; filled markers). <b>Theoretical speedup</b> = dense MACs / realized MACs.
<b>Measured speedup</b> = dense latency / realized latency, both timed in the same process on the same device and
input, eval and inference mode, warm-up, alternating timed blocks, median, at batch 1 and a throughput batch (the
leaderboard shows the throughput batch) with a bootstrap 95 % interval. Unstructured masks are realized by
<b>auto</b>: per layer the faster of dense and a CSR × dense kernel (convolutions lowered to columns), chosen by a
short timed calibration at the throughput batch and recorded per layer on the run's page; "auto: all dense" means
no layer won and the masked model ran dense. <b>not realizable</b>: no realizer ran on that device. The dense row
times the dense model against a copy of itself: its distance from 1.00× is the timing noise left.</p>
{table(["device", "batch sizes", "threads", "rounds", "seconds per block", "dtype", "compile"], measure_rows)}
"""
    return _page("Protocol: what the numbers mean", body)


# --- build --------------------------------------------------------------------------------------
def build_site(records: Iterable[RunRecord], out: Path, title: str = "sparsebench leaderboard",
               svg: bool = True) -> List[Path]:
    """Write the site under `out`; returns every file written. `svg`: each plot also as SVG."""
    from sparsebench.report.plots import plot

    out = Path(out)
    records = sorted(records, key=lambda r: r.run_id)
    runs = runs_frame(records)
    summary = summarize(runs)
    written: List[Path] = []

    def write(rel: str, text: str) -> None:
        atomic_write_text(out / rel, text)
        written.append(out / rel)

    for name in ("site.css", "site.js"):
        data = resources.files("sparsebench.report").joinpath("assets", name).read_bytes()
        atomic_write_bytes(out / "assets" / name, data)
        written.append(out / "assets" / name)
    plots: Dict[tuple, Dict[str, str]] = {}
    if not summary.empty:
        for (dataset, model), part in summary.groupby(["dataset", "model"], sort=True):
            files = {}
            for kind, x in (("MACs", "macs"), ("measured speedup", "speedup")):
                rel = f"plots/{slug(dataset, model)}__{x}.png"
                plot(part, out / rel, x=x, formats=("svg",) if svg else ())
                written += [out / rel] + ([(out / rel).with_suffix(".svg")] if svg else [])
                files[kind] = rel
            plots[(dataset, model)] = files
    write("index.html", _index(summary, plots, len(records), title, svg))
    write("protocol.html", _protocol(runs, records, summary))
    write("compare.html", _compare_page(runs))
    by_id = {r["run_id"]: r for r in runs.to_dict("records")} if not runs.empty else {}
    for record in records:
        name = slug(record.run_id)
        curve_files = {}
        for stage in curve_stages(record.curves):
            rel = f"{name}__curve_{slug(stage)}.svg"
            write(f"runs/{rel}", curve_svg(stage, record.curves[stage]))
            curve_files[stage] = rel
        write(f"runs/{name}.html", _run_page(record, by_id[record.run_id], curve_files))
    remove_stale(out, written)
    return written


def remove_stale(out: Path, written: List[Path]) -> List[Path]:
    """Delete the pages and plots under `out/runs` and `out/plots` this build did not write: those of
    runs no longer among the records (a removed run, a renamed setting), which would otherwise stay
    linked from nowhere and be read as results. Returns what was removed."""
    keep = {p.resolve() for p in written}
    removed = []
    for folder in ("runs", "plots"):
        for path in sorted((out / folder).glob("*")) if (out / folder).is_dir() else []:
            if path.is_file() and path.suffix in (".html", ".svg", ".png") and path.resolve() not in keep:
                path.unlink()
                removed.append(path)
    return removed


__all__ = ["FAMILIES", "build_site"]
