"""What a training stage did, step by step: loss, learning rate, validation accuracy and the
mask or structure updates a method made (`TrainingCurve`), kept for the record's `curves`, in
bounded memory whatever the step count (loss and lr in at most `MAX_POINTS` bins per stage).

Every `Trainer` appends to one curve per stage (a method's trainers share the method's, so
the step axis is the method's budget steps). A hook marks what it did with
`trainer.event(kind, **numbers)`, e.g. a RigL topology update with the weights it swapped;
a search hook that measures something of its own (PASS's masked validation accuracy) adds
it with `curve.add_value(name, step, value)`.

A curve with a `log` (a `training.watch.StageLog`, set while a run is watched) hands every point
on as it is added, for live curves in TensorBoard; one loaded from a checkpoint tells its log the
last step it holds, so a resumed run does not write those points again.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

MAX_POINTS = 2048       # loss/lr bins a stage keeps in memory and in its mid-fit checkpoints
MAX_EVENTS = 2048       # events kept with their numbers (every one is counted by kind)


class TrainingCurve:
    """Loss and learning rate in bounded bins, validation points and events of one training stage.

    Steps are kept in at most `max_points` bins, whatever the step count (SViTE on ImageNet takes
    ~1.5 M steps, and the curve is in every mid-fit checkpoint): each bin has its first and last
    step, how many steps it holds, their loss sum and the lr at its first step. A bin holds `width`
    steps (the last one may hold fewer); when a step would open one bin too many, adjacent pairs
    merge and `width` doubles. Up to `max_points` steps every step is its own bin (`steps`, `loss`,
    `lr` are then the per-step lists). Events beyond the first `MAX_EVENTS` are counted by kind only.
    """

    def __init__(self, max_points: int = MAX_POINTS):
        if max_points < 2:
            raise ValueError(f"a curve needs max_points >= 2, got {max_points}")
        self.max_points = max_points
        self.width = 1                              # steps per bin, a power of two
        self.first_step: List[int] = []             # per bin
        self.last_step: List[int] = []
        self.count: List[int] = []
        self.loss_sum: List[float] = []
        self.lr: List[float] = []                   # the lr at the bin's first step
        self.val: List[List[float]] = []            # [step, top1]
        self.events: List[List[Any]] = []           # [step, kind, {numbers}], the first MAX_EVENTS
        self.event_counts: Dict[str, int] = {}      # every event, by kind
        self.values: Dict[str, List[List[float]]] = {}   # name -> [[step, value], ...]
        self.log = None                             # a StageLog that gets every point as it comes

    @property
    def steps(self) -> List[int]:
        """The first step of each bin (every step while there are at most `max_points`)."""
        return self.first_step

    @property
    def loss(self) -> List[float]:
        """The mean training loss of each bin."""
        return [total / n for total, n in zip(self.loss_sum, self.count)]

    def add_step(self, step: int, loss: float, lr: float) -> None:
        if self.log is not None:
            self.log.step(step, loss, lr)
        if self.count and self.count[-1] < self.width:
            self.last_step[-1] = int(step)
            self.count[-1] += 1
            self.loss_sum[-1] += float(loss)
            return
        self.first_step.append(int(step))
        self.last_step.append(int(step))
        self.count.append(1)
        self.loss_sum.append(float(loss))
        self.lr.append(float(lr))
        if len(self.count) > self.max_points:
            self._merge_pairs()

    def _merge_pairs(self) -> None:
        """Bins 2i and 2i+1 become one; every bin but the last then holds the doubled width."""
        n = len(self.count)
        self.first_step = self.first_step[::2]
        self.lr = self.lr[::2]
        self.last_step = [self.last_step[min(i + 1, n - 1)] for i in range(0, n, 2)]
        self.count = [sum(self.count[i:i + 2]) for i in range(0, n, 2)]
        self.loss_sum = [sum(self.loss_sum[i:i + 2]) for i in range(0, n, 2)]
        self.width *= 2

    def add_val(self, step: int, top1: float) -> None:
        self.val.append([int(step), float(top1)])
        if self.log is not None:
            self.log.val(step, top1)

    def add_event(self, step: int, kind: str, **numbers: Any) -> None:
        if self.log is not None:
            self.log.event(step, kind, numbers)
        self.event_counts[str(kind)] = self.event_counts.get(str(kind), 0) + 1
        if len(self.events) < MAX_EVENTS:
            self.events.append([int(step), str(kind), dict(numbers)])

    def add_value(self, name: str, step: int, value: float) -> None:
        self.values.setdefault(name, []).append([int(step), float(value)])
        if self.log is not None:
            self.log.value(name, step, value)

    def last_position(self) -> int:
        """The latest step at which the curve holds anything (-1 when empty)."""
        ends = [self.last_step[-1]] if self.last_step else []
        ends += [s for s, _ in self.val[-1:]] + [e[0] for e in self.events[-1:]]
        ends += [points[-1][0] for points in self.values.values() if points]
        return int(max(ends, default=-1))

    def __len__(self) -> int:
        """Steps recorded (not bins)."""
        return sum(self.count)

    def events_of(self, kind: str) -> List[Dict[str, Any]]:
        """The numbers of every kept event of one kind, in order, each with its step
        (`event_count(kind)` counts them all)."""
        return [{"step": s, **numbers} for s, k, numbers in self.events if k == kind]

    def event_count(self, kind: str) -> int:
        return self.event_counts.get(kind, 0)

    def as_dict(self, max_points: int = 100, max_events: int = 200) -> Optional[Dict[str, Any]]:
        """The curve for a record: at most `max_points` loss/lr points (the loss averaged over
        each bin of steps, the lr at the bin's first step), every validation point, and the
        events (the first `max_events`; `events_dropped` counts the rest). None if empty.
        A record's bin is a whole number of the kept bins (`steps_per_point` a multiple of `width`)."""
        if not self.count and not self.val and not self.events and not self.values:
            return None
        n = len(self)
        per_bin = self.width * max(1, math.ceil(math.ceil(n / max_points) / self.width))
        group = per_bin // self.width
        steps, loss, lr = [], [], []
        for start in range(0, len(self.count), group):
            steps.append(self.first_step[start])
            loss.append(round(sum(self.loss_sum[start:start + group]) / sum(self.count[start:start + group]), 5))
            lr.append(float(f"{self.lr[start]:.4g}"))
        out = {"step": steps, "loss": loss, "lr": lr, "steps_per_point": per_bin,
               "val": [[s, round(v, 3)] for s, v in self.val],
               "events": [[s, k, _rounded(numbers)] for s, k, numbers in self.events[:max_events]]}
        total_events = sum(self.event_counts.values())
        if total_events > max_events:
            out["events_dropped"] = total_events - min(max_events, len(self.events))
        if self.values:
            out["values"] = {name: [[s, round(v, 5)] for s, v in points] for name, points in self.values.items()}
        return out

    def state_dict(self) -> dict:
        return {"max_points": self.max_points, "width": self.width,
                "bins": {"first_step": list(self.first_step), "last_step": list(self.last_step),
                         "count": list(self.count), "loss_sum": list(self.loss_sum), "lr": list(self.lr)},
                "val": [list(v) for v in self.val], "events": [list(e) for e in self.events],
                "event_counts": dict(self.event_counts),
                "values": {k: [list(p) for p in v] for k, v in self.values.items()}}

    def load_state_dict(self, state: dict) -> None:
        """A curve's state; one saved before bins (a `steps`, `loss`, `lr` list per step) is binned here.
        Its points are not handed to the log (they were, before the checkpoint): the log learns the last."""
        log, self.log = self.log, None
        try:
            self._load_state_dict(state)
        finally:
            self.log = log
        if log is not None:
            log.resumed(self.last_position())

    def _load_state_dict(self, state: dict) -> None:
        self.val = [list(v) for v in state["val"]]
        self.values = {k: [list(p) for p in v] for k, v in state.get("values", {}).items()}
        self.events, self.event_counts = [], {}
        for step, kind, numbers in state["events"]:
            self.add_event(step, kind, **numbers)
        if "event_counts" in state:
            self.event_counts = {str(k): int(v) for k, v in state["event_counts"].items()}
        if "bins" not in state:
            self.width, self.first_step, self.last_step, self.count, self.loss_sum, self.lr = 1, [], [], [], [], []
            for step, loss, lr in zip(state["steps"], state["loss"], state["lr"]):
                self.add_step(step, loss, lr)
            return
        bins = state["bins"]
        self.max_points, self.width = int(state["max_points"]), int(state["width"])
        self.first_step, self.last_step = [int(v) for v in bins["first_step"]], [int(v) for v in bins["last_step"]]
        self.count = [int(v) for v in bins["count"]]
        self.loss_sum, self.lr = [float(v) for v in bins["loss_sum"]], [float(v) for v in bins["lr"]]


def _rounded(numbers: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in numbers.items()}
