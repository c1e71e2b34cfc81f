"""What a training stage did, step by step: loss, learning rate, validation accuracy and the
mask or structure updates a method made (`TrainingCurve`), kept for the record's `curves`.

Every `Trainer` appends to one curve per stage (a method's trainers share the method's, so
the step axis is the method's budget steps). A hook marks what it did with
`trainer.event(kind, **numbers)`, e.g. a RigL topology update with the weights it swapped;
a search hook that measures something of its own (PASS's masked validation accuracy) adds
it with `curve.add_value(name, step, value)`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional


class TrainingCurve:
    """Per-step loss and learning rate, validation points and events of one training stage."""

    def __init__(self):
        self.steps: List[int] = []
        self.loss: List[float] = []
        self.lr: List[float] = []
        self.val: List[List[float]] = []            # [step, top1]
        self.events: List[List[Any]] = []           # [step, kind, {numbers}]
        self.values: Dict[str, List[List[float]]] = {}   # name -> [[step, value], ...]

    def add_step(self, step: int, loss: float, lr: float) -> None:
        self.steps.append(int(step))
        self.loss.append(float(loss))
        self.lr.append(float(lr))

    def add_val(self, step: int, top1: float) -> None:
        self.val.append([int(step), float(top1)])

    def add_event(self, step: int, kind: str, **numbers: Any) -> None:
        self.events.append([int(step), str(kind), dict(numbers)])

    def add_value(self, name: str, step: int, value: float) -> None:
        self.values.setdefault(name, []).append([int(step), float(value)])

    def __len__(self) -> int:
        return len(self.steps)

    def events_of(self, kind: str) -> List[Dict[str, Any]]:
        """The numbers of every event of one kind, in order, each with its step."""
        return [{"step": s, **numbers} for s, k, numbers in self.events if k == kind]

    def as_dict(self, max_points: int = 100, max_events: int = 200) -> Optional[Dict[str, Any]]:
        """The curve for a record: at most `max_points` loss/lr points (the loss averaged over
        each bin of steps, the lr at the bin's first step), every validation point, and the
        events (the first `max_events`; `events_dropped` counts the rest). None if empty."""
        if not self.steps and not self.val and not self.events and not self.values:
            return None
        n = len(self.steps)
        per_bin = max(1, math.ceil(n / max_points))
        steps, loss, lr = [], [], []
        for start in range(0, n, per_bin):
            chunk = self.loss[start:start + per_bin]
            steps.append(self.steps[start])
            loss.append(round(sum(chunk) / len(chunk), 5))
            lr.append(float(f"{self.lr[start]:.4g}"))
        out = {"step": steps, "loss": loss, "lr": lr, "steps_per_point": per_bin,
               "val": [[s, round(v, 3)] for s, v in self.val],
               "events": [[s, k, _rounded(numbers)] for s, k, numbers in self.events[:max_events]]}
        if len(self.events) > max_events:
            out["events_dropped"] = len(self.events) - max_events
        if self.values:
            out["values"] = {name: [[s, round(v, 5)] for s, v in points] for name, points in self.values.items()}
        return out

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "loss": list(self.loss), "lr": list(self.lr),
                "val": [list(v) for v in self.val], "events": [list(e) for e in self.events],
                "values": {k: [list(p) for p in v] for k, v in self.values.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.loss, self.lr = list(state["steps"]), list(state["loss"]), list(state["lr"])
        self.val, self.events = [list(v) for v in state["val"]], [list(e) for e in state["events"]]
        self.values = {k: [list(p) for p in v] for k, v in state.get("values", {}).items()}


def _rounded(numbers: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in numbers.items()}
