"""What a suite costs before it runs: device-hours per suite, per method and per (method, model).

Each run's time is predicted phase by phase as the sweep's ETA predicts it (`progress.SweepEta`):
the dense pretrain once per dense checkpoint, the method's steps (the dense-pretrain budget for
a scratch method, the search budget for one that starts from a trained model; P-GaP's replicas
count in full), the shared fine-tune's steps, and a fixed part per run. Seconds per step come
from **measured step costs** where records of the same model exist (the `--compare` directory's
and the output directory's, the median over their phases), else from **MACs at a stated
throughput**: 3 × forward MACs × 2 FLOPs × batch per step at `--assume-tflops` sustained
(20 for a GPU in TF32/bf16, roughly an A100; 0.02 for a 2-core CPU). Training FLOPs only: data
loading and validation are extra, so a MACs-based figure is a lower bound; a measured one is
only as good as the device its records came from, which the table names.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Tuple

from sparsebench.methods.base import method_label as args_label
from sparsebench.runners.progress import SweepEta
from sparsebench.runners.suite import human_seconds
from sparsebench.specs import RunSpec, stable_hash


@dataclass
class Line:
    runs: int = 0
    steps: int = 0
    seconds: float = 0.0
    models: set = field(default_factory=set)


@dataclass
class RunCost:
    spec: RunSpec
    steps: int                                     # optimizer steps, the dense pretrain's in its first run
    seconds: float


@dataclass
class SuiteCost:
    name: str
    per_pair: Dict[Tuple[str, str], Line]          # (method label, model) -> runs, steps, seconds
    runs: List[RunCost]                            # in the suite's order
    sources: Dict[str, str]                        # model -> where its seconds per step come from
    dense_seconds: float
    assume_tflops: float

    @property
    def total_seconds(self) -> float:
        return sum(line.seconds for line in self.per_pair.values())

    def per_method(self) -> Dict[str, Line]:
        out: Dict[str, Line] = defaultdict(Line)
        for (method, model), line in self.per_pair.items():
            out[method].runs += line.runs
            out[method].steps += line.steps
            out[method].seconds += line.seconds
            out[method].models.add(model)
        return dict(out)


def method_label(spec: RunSpec) -> str:
    """The method and the arguments a suite set (not its defaults), as the leaderboard labels it."""
    return args_label(spec.method, dict(spec.method_args))


def suite_cost(name: str, specs: List[RunSpec], records: Iterable = (), assume_tflops: float = 20.0) -> SuiteCost:
    """Predicted seconds of every run of `specs` on one device (module docstring)."""
    records = list(records)
    eta = SweepEta.plan(specs, reference=records, assume_tflops=assume_tflops)
    pending = {p.dense_key for p in eta.plans}
    per_pair: Dict[Tuple[str, str], Line] = defaultdict(Line)
    runs: List[RunCost] = []
    dense = 0.0
    for plan in eta.plans:
        had = plan.dense_key in pending
        seconds = eta.predicted(plan, pending)
        steps = plan.steps["method"] + plan.steps["finetune"]
        if had:
            dense += plan.steps["pretrain"] * eta.seconds_per_step(plan.spec.model, "pretrain")
            steps += plan.steps["pretrain"]
        runs.append(RunCost(plan.spec, steps, seconds))
        line = per_pair[(method_label(plan.spec), plan.spec.model)]
        line.runs += 1
        line.steps += steps
        line.seconds += seconds
    sources = {}
    for model in sorted({p.spec.model for p in eta.plans}):
        mine = [r for r in records if r.model == model and r.cost.dense_pretrain_steps]
        if any(m == model for m, _ in eta.per_step):
            devices = sorted({str(getattr(r, "device", "") or "?") for r in mine}) or ["?"]
            sources[model] = f"measured step costs ({len(mine)} records; {', '.join(devices)})"
        else:
            sources[model] = f"MACs at {assume_tflops:g} TFLOP/s"
    return SuiteCost(name, dict(per_pair), runs, sources, dense, assume_tflops)


def hours(seconds: float) -> str:
    h = seconds / 3600
    return f"{h:,.0f}" if h >= 100 else f"{h:,.1f}" if h >= 1 else f"{h:.2f}" if h >= 0.1 else f"{h:.4f}"


def cost_report(cost: SuiteCost, gpus: Tuple[int, ...] = (8, 64)) -> str:
    """The dry run's tables: every run, device-hours per method (all models) with its share, per
    (method, model) with its steps, where the seconds per step came from, and the suite's total."""
    total = cost.total_seconds
    lines = [f"{'run':<72} {'steps':>8} {'est.':>8}"]
    lines += [f"{r.spec.run_id[:72]:<72} {r.steps:>8} {human_seconds(r.seconds):>8}" for r in cost.runs]
    lines += ["", f"device-hours by method (one device at {cost.assume_tflops:g} TFLOP/s sustained where no step "
                  f"cost was measured; dense pretraining counted in the first run of each checkpoint):",
              f"{'method':<60} {'runs':>6} {'hours':>9} {'share':>6}"]
    for method, line in sorted(cost.per_method().items(), key=lambda kv: -kv[1].seconds):
        lines.append(f"{method[:60]:<60} {line.runs:>6} {hours(line.seconds):>9} {line.seconds / max(total, 1e-9):>6.1%}")
    lines += ["", f"{'method':<44} {'model':<22} {'runs':>5} {'steps':>9} {'hours':>9} {'est.':>8}"]
    for (method, model), line in sorted(cost.per_pair.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(f"{method[:44]:<44} {model[:22]:<22} {line.runs:>5} {line.steps:>9} {hours(line.seconds):>9} "
                     f"{human_seconds(line.seconds):>8}")
    lines += ["", "seconds per step from: " + "; ".join(f"{m}: {s}" for m, s in cost.sources.items())]
    runs = len(cost.runs)
    checkpoints = len({stable_hash(r.spec.dense_key()) for r in cost.runs})
    spread = ", ".join(f"{hours(total / n)} h on {n}" for n in gpus)
    lines.append(f"suite {cost.name}: {runs} runs, {checkpoints} dense checkpoints, {hours(total)} device-hours "
                 f"({human_seconds(total)} on one device, {total / 86400:.1f} device-days; dense pretraining "
                 f"{hours(cost.dense_seconds)} h); at full use {spread} devices")
    return "\n".join(lines)


__all__ = ["RunCost", "SuiteCost", "cost_report", "method_label", "suite_cost"]
