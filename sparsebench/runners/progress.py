"""A sweep's progress and ETA from measured per-phase costs.

Each run's remaining cost is predicted phase by phase: the dense pretrain (once per dense
checkpoint), the method's steps, the shared fine-tune's steps, and a fixed part per run
(evaluation, MACs, latency timing). Seconds per step of each (model, phase) come from the
records of finished runs: this sweep's as they land, else a reference directory's (e.g. the
committed results/quick), else the FLOPs estimate `--dry-run` uses. The fixed part starts
from the latency protocol's own arithmetic and is re-measured as runs finish. A rate over
finished runs would be wrong by the factor between a 1-second one-shot prune and a
35-second dense pretrain; this is not.

With several workers (`workers`), training overlaps but latency timing does not: it runs in
the sweep's exclusive timing section while the other workers pause. The remaining wall time is
then the training of the unfinished runs divided among the workers, plus their fixed parts one
after another. A finished run's fixed part is what its phases other than training took
(`PhaseTimes`), so neither another run's overlap nor a pause for its timing is counted twice.

`PlainProgress` prints one line per finished run, at most every `interval` seconds (and the
last one), for logs and CI where a progress bar would be a wall of carriage returns; the runs
in progress are named on each line with their stage, step and own ETA (from the status files
their `RunWatch`es keep under OUT/.progress), and a line comes every `interval` seconds while
none finishes.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from sparsebench.runners.pipeline import TRAINING_PHASES
from sparsebench.runners.suite import estimate_cost, human_seconds
from sparsebench.specs import RunSpec, stable_hash
from sparsebench.training.watch import describe_running, running_runs

PHASES = ("pretrain", "method", "finetune")


@dataclass
class RunPlan:
    spec: RunSpec
    steps: Dict[str, int]                # phase -> optimizer steps this run will spend
    dense_key: str


@dataclass
class SweepEta:
    plans: List[RunPlan]
    per_step: Dict[Tuple[str, str], float] = field(default_factory=dict)    # (model, phase) -> s/step
    fallback_per_step: Dict[str, float] = field(default_factory=dict)       # model -> FLOPs estimate
    fixed: Dict[str, float] = field(default_factory=dict)                   # model -> s per run besides training
    dense_done: set = field(default_factory=set)
    finished: set = field(default_factory=set)
    workers: int = 1
    _observed: Dict[Tuple[str, str], List[float]] = field(default_factory=dict)

    @classmethod
    def plan(cls, specs: Iterable[RunSpec], reference: Iterable = (), done_dense: Iterable[str] = (),
             assume_tflops: float = 0.02, workers: int = 1) -> "SweepEta":
        from sparsebench.methods import create_method

        plans, costs = [], {}
        for s in specs:
            key = (s.model, s.dataset, s.data.img_size, s.recipe)     # a method entry may set its own epochs
            if key not in costs:
                costs[key] = estimate_cost(s, assume_tflops)
            c = costs[key]["steps"]
            method = create_method(s.method, **dict(s.method_args))
            trains = method.granularity != "none"
            steps = {"pretrain": c["pretrain"],
                     "method": method.method_budget(c["pretrain"], c["search"]) if trains else 0,
                     "finetune": c["finetune"] if trains else 0}
            plans.append(RunPlan(s, steps, stable_hash(s.dense_key())))
        eta = cls(plans, dense_done=set(done_dense), workers=max(1, workers))
        for key, c in costs.items():
            eta.fallback_per_step[key[0]] = c["seconds_per_step"]
        for s in (p.spec for p in plans):
            m = s.measure
            # dense and realized, each `rounds` blocks of `min_run_time` per batch size; plus evaluation
            timing = m.rounds * m.min_run_time * 2 * len(m.batch_sizes) if m.latency else 0.0
            eta.fixed.setdefault(s.model, timing + 0.5)
        for r in reference:
            eta._learn(r, reference=True)
        return eta

    def _learn(self, r, reference: bool = False) -> None:
        cost = r.cost
        for phase, steps, seconds in (("pretrain", cost.dense_pretrain_steps, cost.dense_pretrain_wall_seconds),
                                      ("method", cost.method_steps, cost.method_wall_seconds),
                                      ("finetune", cost.finetune_steps, cost.finetune_wall_seconds)):
            if steps and seconds:
                key = (r.model, phase)
                obs = self._observed.setdefault(key, [])
                obs.append((seconds / steps, reference))
                mine = [v for v, ref in obs if not ref]     # this machine's numbers replace the reference's
                values = mine or [v for v, _ in obs]
                self.per_step[key] = sorted(values)[len(values) // 2]

    def seconds_per_step(self, model: str, phase: str) -> float:
        return self.per_step.get((model, phase)) or self.per_step.get((model, "pretrain")) or \
            self.fallback_per_step.get(model, 0.01)

    def predicted(self, plan: RunPlan, dense_pending: Optional[set] = None) -> float:
        return sum(self._parts(plan, dense_pending))

    def _parts(self, plan: RunPlan, dense_pending: Optional[set] = None) -> Tuple[float, float]:
        """(training seconds, fixed seconds) of one run."""
        s = plan.spec
        train = plan.steps["method"] * self.seconds_per_step(s.model, "method")
        train += plan.steps["finetune"] * self.seconds_per_step(s.model, "finetune")
        if dense_pending is not None and plan.dense_key in dense_pending:
            dense_pending.discard(plan.dense_key)
            train += plan.steps["pretrain"] * self.seconds_per_step(s.model, "pretrain")
        return train, self.fixed.get(s.model, 2.0)

    def _wall(self, plans: Iterable[RunPlan]) -> float:
        pending = {p.dense_key for p in self.plans} - self.dense_done
        parts = [self._parts(p, pending) for p in plans]
        train, fixed = sum(t for t, _ in parts), sum(f for _, f in parts)
        if self.workers == 1:
            return train + fixed
        # the workers share the training; the fixed parts (mostly exclusive latency timing) queue
        longest = max((t + f for t, f in parts), default=0.0)
        return max(longest, train / self.workers + fixed)

    def remaining(self) -> float:
        return self._wall(p for p in self.plans if p.spec.run_id not in self.finished)

    def total(self) -> float:
        return self._wall(self.plans)

    def finish(self, spec: RunSpec, wall: float, record=None, phases: Optional[Dict[str, float]] = None) -> None:
        """A run ended after `wall` seconds; learn its phase costs from its record, and its fixed
        part from its `phases` (seconds per `PhaseTimes` phase) where given."""
        self.finished.add(spec.run_id)
        plan = next((p for p in self.plans if p.spec.run_id == spec.run_id), None)
        trained_dense = plan is not None and plan.dense_key not in self.dense_done
        if plan is not None:
            self.dense_done.add(plan.dense_key)
        if record is None:
            return
        self._learn(record)
        if phases:
            fixed = sum(v for k, v in phases.items() if k not in TRAINING_PHASES)
        else:
            c = record.cost
            trained = c.method_wall_seconds + c.finetune_wall_seconds
            if trained_dense:
                trained += c.dense_pretrain_wall_seconds
            fixed = max(0.0, wall - trained)
        old = self.fixed.get(spec.model)
        self.fixed[spec.model] = fixed if old is None else 0.5 * (old + fixed)


class PlainProgress:
    """One line per finished run (at most every `interval` s, and always the last and every run whose
    mechanism did not act or that missed its target). With `running` (the results directory's
    OUT/.progress), each line also names the runs in progress, where they are and their own ETA, and
    while no run finishes a line still comes every `interval` s (a thread)."""

    def __init__(self, total: int, name: str, eta: Optional[SweepEta], interval: float = 15.0, stream=None,
                 running: Optional[Path] = None):
        self.total, self.name, self.eta, self.interval = total, name, eta, interval
        self.stream = stream or sys.stdout
        self.running = running
        self.done = 0
        self.start = time.perf_counter()
        self.last = -float("inf")
        self.last_what = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = None
        if running is not None and interval > 0:       # interval 0: every run prints its line anyway
            self._ticker = threading.Thread(target=self._tick, name="sweep-progress", daemon=True)
            self._ticker.start()

    def update(self, what: str = "", note: str = "") -> None:
        """`note`: why the run's number is not the method's own (did not act, missed its target); such a
        run always gets its line, whatever the interval."""
        with self._lock:
            self.done += 1
            self.last_what = what + (f": {note}" if note else "")
            now = time.perf_counter()
            if not note and now - self.last < self.interval and self.done < self.total:
                return
            self._print(now)

    def _print(self, now: float) -> None:
        self.last = now
        eta = f", ETA {human_seconds(self.eta.remaining())}" if self.eta is not None and self.done < self.total else ""
        running = running_runs(self.running) if self.running is not None and self.done < self.total else []
        print(f"[{self.name}] {self.done}/{self.total} runs, {human_seconds(now - self.start)} elapsed{eta}"
              + (f"; last: {self.last_what}" if self.last_what else "")
              + (f"; running: {'; '.join(describe_running(r) for r in running)}" if running else ""),
              file=self.stream, flush=True)

    def _tick(self) -> None:
        # never a busy loop: a thread that wakes without pause holds the GIL from the runs it reports on
        while not self._stop.wait(max(0.5, min(self.interval, 5.0))):
            with self._lock:
                now = time.perf_counter()
                if now - self.last >= self.interval and self.done < self.total:
                    self._print(now)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=10.0)


def describe_plan(eta: SweepEta) -> str:
    return json.dumps({"runs": len(eta.plans), "predicted_seconds": round(eta.total(), 1)})
