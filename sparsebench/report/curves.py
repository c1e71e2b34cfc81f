"""A record's training curve of one stage as a small, self-contained SVG, written by hand.

Top panel: training loss (left axis), validation top-1 points and any extra measured series
(`values`, e.g. PASS's masked validation accuracy; right axis). Bottom panel: learning rate.
Events (mask or structure updates) are vertical ticks across both panels, one colour per kind;
with many events the ticks are thin and faint so the curves stay readable.

Hand-written rather than matplotlib: a site of ~300 runs draws ~600 of these, and a
matplotlib figure per stage costs more than the rest of the site together.
"""
from __future__ import annotations

import html
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

W, H = 640, 300
LEFT, RIGHT = 58, 58
TOP_Y, TOP_H = 40, 150          # loss / accuracy panel
LR_Y, LR_H = 212, 56            # learning-rate panel
LOSS_COLOR, VAL_COLOR, LR_COLOR = "#1f77b4", "#d62728", "#7f7f7f"
VALUE_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")
EVENT_COLORS = ("#ff7f0e", "#bcbd22", "#17becf", "#9467bd", "#8c564b", "#e377c2")
MANY_EVENTS = 40                # more than this: thin, faint ticks


def _esc(v: Any) -> str:
    return html.escape(str(v))


def nice_ticks(lo: float, hi: float, n: int = 4) -> List[float]:
    """About `n` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _num(v: float) -> str:
    return f"{v:.3g}" if (v == 0 or 1e-3 <= abs(v) < 1e4) else f"{v:.1e}"


def _finite(points: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    return [(float(x), float(y)) for x, y in points
            if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))]


def _span(values: Sequence[float], pad: float = 0.05) -> Tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = lo - (abs(lo) * 0.1 or 0.5), hi + (abs(hi) * 0.1 or 0.5)
    d = (hi - lo) * pad
    return lo - d, hi + d


class _Axis:
    def __init__(self, lo: float, hi: float, y0: float, height: float):
        self.lo, self.hi, self.y0, self.height = lo, hi, y0, height

    def __call__(self, v: float) -> float:
        return self.y0 + self.height * (1 - (v - self.lo) / (self.hi - self.lo))


def curve_svg(stage: str, curve: Dict[str, Any]) -> str:
    """The SVG of one stage's curve from a record's `curves[stage]`."""
    loss = _finite(zip(curve.get("step") or [], curve.get("loss") or []))
    lr = _finite(zip(curve.get("step") or [], curve.get("lr") or []))
    val = _finite([(p[0], p[1]) for p in curve.get("val") or []])
    values = {name: _finite([(p[0], p[1]) for p in pts]) for name, pts in (curve.get("values") or {}).items()}
    values = {k: v for k, v in values.items() if v}
    events = [(float(e[0]), str(e[1])) for e in curve.get("events") or [] if e and e[0] is not None]
    xs = [x for x, _ in loss + lr + val + [p for v in values.values() for p in v]] + [s for s, _ in events]
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    plot_w = W - LEFT - RIGHT

    def px(x: float) -> float:
        return LEFT + plot_w * (x - x_lo) / (x_hi - x_lo)

    out: List[str] = []

    def polyline(points, axis, color, width=1.5, dash="") -> None:
        if len(points) == 1:
            x, y = points[0]
            out.append(f'<circle cx="{px(x):.1f}" cy="{axis(y):.1f}" r="2.5" fill="{color}"/>')
            return
        d = " ".join(f"{px(x):.1f},{axis(y):.1f}" for x, y in points)
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="{width}"{extra}/>')

    def y_ticks(axis: _Axis, side: str, color: str) -> None:
        for t in nice_ticks(axis.lo, axis.hi, 4 if axis.height > 80 else 2):
            if not axis.lo <= t <= axis.hi:
                continue
            y = axis(t)
            if side == "left":
                out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                           f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end" fill="{color}">{_num(t)}</text>')
            else:
                out.append(f'<text x="{W - RIGHT + 4}" y="{y + 4:.1f}" fill="{color}">{_num(t)}</text>')

    # panels and x axis
    for y0, h in ((TOP_Y, TOP_H), (LR_Y, LR_H)):
        out.append(f'<rect x="{LEFT}" y="{y0}" width="{plot_w}" height="{h}" fill="none" stroke="#bbb"/>')
    for t in nice_ticks(x_lo, x_hi, 6):
        if x_lo <= t <= x_hi:
            out.append(f'<text x="{px(t):.1f}" y="{LR_Y + LR_H + 13}" text-anchor="middle">{_num(t)}</text>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{H - 4}" text-anchor="middle">step</text>')

    # events first, so the curves draw over them
    kinds = sorted({k for _, k in events})
    kind_color = {k: EVENT_COLORS[i % len(EVENT_COLORS)] for i, k in enumerate(kinds)}
    thin = len(events) > MANY_EVENTS
    for s, k in events:
        x = px(s)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP_Y}" y2="{LR_Y + LR_H}" stroke="{kind_color[k]}" '
                   f'stroke-width="{0.6 if thin else 1.2}" opacity="{0.35 if thin else 0.7}"/>')

    legend: List[Tuple[str, str, str]] = []         # (label, colour, shape)
    if loss:
        axis = _Axis(*_span([y for _, y in loss]), TOP_Y, TOP_H)
        y_ticks(axis, "left", LOSS_COLOR)
        polyline(loss, axis, LOSS_COLOR)
        per = curve.get("steps_per_point") or 1
        legend.append((f"training loss{f' (mean of {per} steps)' if per > 1 else ''}", LOSS_COLOR, "line"))
        out.append(f'<text transform="translate(12,{TOP_Y + TOP_H / 2}) rotate(-90)" text-anchor="middle" '
                   f'fill="{LOSS_COLOR}">loss</text>')
    accuracy = val + [p for v in values.values() for p in v]
    if accuracy:
        axis = _Axis(*_span([y for _, y in accuracy]), TOP_Y, TOP_H)
        y_ticks(axis, "right", VAL_COLOR)
        out.append(f'<text transform="translate({W - 10},{TOP_Y + TOP_H / 2}) rotate(90)" text-anchor="middle" '
                   f'fill="{VAL_COLOR}">accuracy</text>')
        for i, (name, points) in enumerate(sorted(values.items())):
            color = VALUE_COLORS[i % len(VALUE_COLORS)]
            polyline(points, axis, color, width=1.2, dash="4 2")
            legend.append((name, color, "line"))
        for x, y in val:
            out.append(f'<circle cx="{px(x):.1f}" cy="{axis(y):.1f}" r="3" fill="{VAL_COLOR}"><title>step {x:g}: '
                       f'val top-1 {y:.4g}</title></circle>')
        if val:
            legend.append(("validation top-1", VAL_COLOR, "dot"))
    if lr:
        axis = _Axis(*_span([y for _, y in lr], 0.1), LR_Y, LR_H)
        y_ticks(axis, "left", LR_COLOR)
        polyline(lr, axis, LR_COLOR, width=1.2)
        out.append(f'<text transform="translate(12,{LR_Y + LR_H / 2}) rotate(-90)" text-anchor="middle" '
                   f'fill="{LR_COLOR}">lr</text>')
        legend.append(("learning rate", LR_COLOR, "line"))
    counts = {k: sum(1 for _, kk in events if kk == k) for k in kinds}
    dropped = curve.get("events_dropped")
    for k in kinds:
        label = f"{k} ({counts[k]}{' shown' if dropped else ''})"
        legend.append((label, kind_color[k], "tick"))
    if not (loss or lr or accuracy or events):
        out.append(f'<text x="{W / 2}" y="{TOP_Y + TOP_H / 2}" text-anchor="middle" fill="#666">'
                   f'nothing recorded in this stage</text>')

    # legend rows above the top panel; more than two push the panels down
    key: List[str] = []
    x, y = LEFT, 14
    for label, color, shape in legend:
        width = 26 + 6.2 * len(label)
        if x + width > W - 8 and x > LEFT:
            x, y = LEFT, y + 15
        if shape == "line":
            key.append(f'<line x1="{x}" x2="{x + 16}" y1="{y - 4}" y2="{y - 4}" stroke="{color}" stroke-width="2"/>')
        elif shape == "dot":
            key.append(f'<circle cx="{x + 8}" cy="{y - 4}" r="3" fill="{color}"/>')
        else:
            key.append(f'<line x1="{x + 8}" x2="{x + 8}" y1="{y - 10}" y2="{y + 2}" stroke="{color}" '
                       f'stroke-width="2"/>')
        key.append(f'<text x="{x + 20}" y="{y}">{_esc(label)}</text>')
        x += width
    if dropped:
        out.append(f'<text x="{W - RIGHT}" y="{LR_Y - 6}" text-anchor="end" fill="#666">'
                   f'{int(dropped)} later events not in the record</text>')
    shift = max(0, y - 29)
    height = H + shift
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<title>{_esc(stage)} stage: training loss, learning rate, validation top-1, events</title>',
        f'<rect width="{W}" height="{height}" fill="white"/>', *key,
        f'<g transform="translate(0,{shift})">', *out, "</g>", "</svg>"]) + "\n"


def curve_stages(curves: Optional[Dict[str, Any]]) -> List[str]:
    """The stages of a record's curves in training order (method, then fine-tune, then any other)."""
    if not curves:
        return []
    order = {"method": 0, "finetune": 1}
    return sorted((s for s, c in curves.items() if c), key=lambda s: (order.get(s, 2), s))


__all__ = ["curve_stages", "curve_svg", "nice_ticks"]
