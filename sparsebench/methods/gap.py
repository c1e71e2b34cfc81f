"""Scheduled grow-and-prune (GaP): Ma et al., "Effective Model Sparsification by Scheduled
Grow-and-Prune Methods", ICLR 2022, arXiv 2106.09857.

The prunable layers are cut into κ contiguous partitions P_0..P_{κ-1}. The model is sparse
at s everywhere except one partition, which is *grown* (unmasked, dense), trained for T
steps and *pruned back* to s by magnitude; then the next partition grows.

- **C-GaP** (`gap-cyclic`; the official README calls it S-GaP): one model, the partitions
  grow in turn, R rounds of κ phases.
- **P-GaP** (`gap-parallel`): each round, κ replicas of the model each grow a different
  partition for T steps; partition k of the merged model comes from replica k (weights,
  biases, norm parameters and statistics of its blocks), tensors outside every partition
  are averaged over the replicas; then every partition is pruned back. Replicas run one
  after another on one device (no torch.distributed yet); compute is κ × replica steps and
  the budget is charged that way.

Mechanism: the regrowth. At every prune-back we measure the fraction of the partition's kept
set that changed (weights kept now that were pruned before the partition grew); GaP acted
when at least one prune-back ran and the mean over phases is >= 0.01 (1 % of the kept
weights of a grown partition moved; a prune-back that restores the old mask regrew
nothing). Null control `regrow=False`: static sparse training of the same initial masks
for the same optimizer steps (P-GaP: κ × replica steps on one model) and the same
fine-tune. Signal control `prune_scores="random"`: every phase grows and prunes back as
usual, but the prune-back keeps by random scores instead of |w| — the same per-layer counts
with the default per-layer `prune_scope`; with `prune_scope="global"` random scores also
re-allocate the counts across layers, so that control tests magnitude *and* its allocation
(it changes the kept set at least as much, so it meets the thresholds: what it tests is
whether magnitude is the signal that helps).

T = ⌊B / (R·κ)⌋ optimizer steps from the run's budget B (not the paper's epoch counts). The
defaults follow the official scripts (R = 10 rounds; a new learning-rate schedule and a fresh
optimizer every phase, `--restart-training`) wherever the budget allows, by one rule: R is the
official 10, lowered until every phase gets at least MIN_PHASE_STEPS = 20 optimizer steps
(about an epoch of our small datasets: a grown partition must train before it is pruned back),
and never below 1. `rounds=` fixes R. On the evidence budgets (285 steps on resnet20_tiny,
570 on vit_cifar_tiny, κ = 3) this gives R = 4 and R = 9. The per-phase schedule is the
recipe's warm-up + cosine [reconstructed for CV; the official Transformer scripts restart
fairseq's inverse-sqrt schedule with Adam], so each prune-back comes at the end of a cosine, at a
learning rate near 0, and the next phase retrains the pruned partition from a restarted rate.
The official script also grows P_0 once before its R rounds (31 phases for R = 10); we run R·κ. The
harness fine-tune, masks fixed, is the paper's final fixed-mask phase. Masks, their
application to weights, gradients and optimizer state, and exact top-k live in
`training.masks`; this file decides partitions, schedule and merge.

Provenance: boone891214/GaP holds only the Transformer/WMT code; the CV partitions and
schedules here are reconstructed (see the spec). Official-code defects not copied: we mask
gradients and optimizer state too (`faithful_masking=True` restores weights-only), use exact
top-k rather than percentiles, mask every listed tensor, and average the tensors outside
the partitions in the P-GaP merge (`merge_shared="fresh"` restores the official behaviour).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Sequence

import torch
from torch import nn

from sparsebench.errors import SpecError
from sparsebench.measure.sparse24 import GROUP, mask_2to4
from sparsebench.training.masks import (
    MaskSet, global_topk_masks, initial_masks, kept_change, prunable_weights, topk_mask,
)
from sparsebench.methods.base import (
    OMITTED_AT_DEFAULT, Method, MethodContext, Outcome, judge_mechanism, register_method,
)
from sparsebench.methods.dst import resolve_skips


# --- partitions ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Partition:
    """A contiguous group of blocks: its module prefixes and its prunable weights."""

    blocks: tuple          # module-name prefixes ("layer2.0", "blocks.3"); their every tensor belongs here
    names: tuple           # prunable weights inside
    size: int              # their element count, N_k

    def owns(self, key: str) -> bool:
        return any(key == b or key.startswith(b + ".") for b in self.blocks)


def _block_of(name: str) -> tuple:
    """(stage, block, repeated) of a parameter name: the block ends at the first numeric
    component ("layer2.0", "blocks.3", "features.7"); a name without one ("conv1", "fc",
    "patch_embed", "head") is its own, non-repeated block."""
    parts = name.split(".")[:-1] or [name]
    for i, part in enumerate(parts):
        if part.isdigit():
            block = ".".join(parts[:i + 1])
            return (parts[0] if i > 0 else block), block, True
    return parts[0], parts[0], False


def _cut_balanced(sizes: Sequence[int], kappa: int) -> List[int]:
    """Start indices of κ contiguous, non-empty groups with about equal total size."""
    total, starts, acc = sum(sizes), [0], 0
    for i, size in enumerate(sizes[:-1]):
        acc += size
        j = len(starts)
        if j < kappa and (acc >= j * total / kappa or len(sizes) - (i + 1) == kappa - j):
            starts.append(i + 1)
    return starts


def make_partitions(params: Dict[str, torch.Tensor], kappa: int, scheme: str) -> List[Partition]:
    """κ contiguous partitions of the prunable blocks [reconstructed for CV].

    `by_stage`: one partition per stage (ResNet `layer1..`); a model with a single stage of
    repeated blocks (a ViT's `blocks`) is split into κ contiguous groups of blocks.
    `balanced_params`: contiguous blocks with about equal weight counts. Non-repeated prunable
    layers (stem, classifier, patch embedding, head; prunable when not skipped) join the
    nearest partition.
    """
    blocks: Dict[str, dict] = {}
    for name, p in params.items():
        stage, block, repeated = _block_of(name)
        entry = blocks.setdefault(block, {"stage": stage, "repeated": repeated, "names": [], "size": 0})
        entry["names"].append(name)
        entry["size"] += p.numel()
    repeated = [b for b, e in blocks.items() if e["repeated"]]
    if not repeated:
        repeated = list(blocks)
    if scheme == "by_stage":
        stages = list(dict.fromkeys(blocks[b]["stage"] for b in repeated))
        if len(stages) == kappa:
            groups = [[b for b in repeated if blocks[b]["stage"] == s] for s in stages]
        elif len(stages) == 1 and kappa <= len(repeated):
            starts = _cut_balanced([1] * len(repeated), kappa)
            groups = [repeated[a:b] for a, b in zip(starts, starts[1:] + [len(repeated)])]
        else:
            raise SpecError(f"partition='by_stage' needs num_groups equal to the {len(stages)} stages "
                            f"({', '.join(stages)}), got {kappa}; use partition='balanced_params'")
    elif scheme == "balanced_params":
        if kappa > len(repeated):
            raise SpecError(f"num_groups={kappa} exceeds the {len(repeated)} prunable blocks of this model")
        starts = _cut_balanced([blocks[b]["size"] for b in repeated], kappa)
        groups = [repeated[a:b] for a, b in zip(starts, starts[1:] + [len(repeated)])]
    else:
        raise SpecError(f"unknown partition {scheme!r}; allowed: by_stage, balanced_params, random")
    order = list(blocks)
    for b in order:                                       # attach non-repeated blocks to a neighbour
        if any(b in g for g in groups):
            continue
        later = [i for i, g in enumerate(groups) if order.index(g[0]) > order.index(b)]
        groups[later[0] if later and later[0] == 0 else (later[0] - 1 if later else len(groups) - 1)].append(b)
    return [Partition(tuple(g), tuple(n for b in g for n in blocks[b]["names"]),
                      sum(blocks[b]["size"] for b in g)) for g in groups]


def random_groups(params: Dict[str, torch.Tensor], kappa: int, phases: int,
                  generator: torch.Generator) -> List[Partition]:
    """`partition='random'` [official code]: each phase grows ⌊L/κ⌋ random layers, never
    the ones grown in the phase before."""
    names = list(params)
    size = len(names) // kappa
    if size < 1:
        raise SpecError(f"num_groups={kappa} exceeds the {len(names)} prunable layers of this model")
    out, last = [], set()
    for _ in range(phases):
        pool = [n for n in names if n not in last]
        picked = [pool[i] for i in torch.randperm(len(pool), generator=generator)[:size].tolist()]
        picked = [n for n in names if n in picked]        # module order
        out.append(Partition((), tuple(picked), sum(params[n].numel() for n in picked)))
        last = set(picked)
    return out


# --- grow, prune back, merge ---------------------------------------------------------------
@torch.no_grad()
def grow(masks: MaskSet, partition: Partition, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Unmask a partition: its pruned weights restart from exactly 0 (they are 0 already),
    survivors keep their values, the optimizer state of regrown entries is zeroed."""
    for name in partition.names:
        masks.update(name, torch.ones_like(masks.masks[name]), optimizer)


@torch.no_grad()
def prune_back(masks: MaskSet, partition: Partition, keep: Dict[str, int], scope: str = "layer",
               pattern: str = "none", generator: Optional[torch.Generator] = None,
               optimizer: Optional[torch.optim.Optimizer] = None, criterion: str = "magnitude") -> None:
    """TopMagnitude(w, keep) per layer (`scope="layer"`), or one |w| threshold over the
    partition keeping the same total (`"global"`; the per-layer counts follow, and `keep` is
    updated). `pattern="2:4"` first restricts candidates to the 2 largest |w| of every 4
    along the input dim (not in the paper; makes the result 2:4-realizable).
    `criterion="random"` (the signal control): uniform random scores from `generator` in place
    of |w|, the same counts, scope and pattern (2:4: 2 random of every 4)."""
    scores = {}
    for name in partition.names:
        w = masks.params[name].detach()
        if criterion == "random":
            score = torch.rand(w.shape, generator=generator).to(w.device)
        else:
            score = w.abs()
        if pattern == "2:4":
            score = torch.where(mask_2to4(score.reshape(w.shape[0], -1)).view_as(w), score, -1.0)
        scores[name] = score
    if scope == "global":
        new = global_topk_masks(scores, 0.0, generator, keep=sum(keep[n] for n in partition.names))
        keep.update({n: int(m.sum()) for n, m in new.items()})
    else:
        new = {n: topk_mask(scores[n], keep[n], generator) for n in partition.names}
    for name, mask in new.items():
        masks.update(name, mask, optimizer)
    if optimizer is not None and not masks.weights_only:
        masks.mask_optimizer_state(optimizer)


def _snapshot(masks: MaskSet, partition: Partition) -> Dict[str, torch.Tensor]:
    return {n: masks.masks[n].clone() for n in partition.names}


@torch.no_grad()
def merge_replicas(model: nn.Module, replicas: Sequence[nn.Module], partitions: Sequence[Partition],
                   shared: str = "average") -> None:
    """P-GaP merge: every tensor of partition k's blocks (weights, biases, norm affine
    parameters and running statistics) from replica k; tensors outside every partition
    (stem, classifier, final norm, embeddings) averaged over the replicas (`shared="average"`),
    taken from replica 0, or left at the model's values (`"fresh"`, the official code)."""
    state = model.state_dict()
    states = [r.state_dict() for r in replicas]
    merged = {}
    for key, value in state.items():
        owner = next((k for k, part in enumerate(partitions) if part.owns(key)), None)
        if owner is not None:
            merged[key] = states[owner][key].clone()
        elif shared == "average" and value.is_floating_point():
            merged[key] = torch.stack([s[key] for s in states]).mean(0)
        elif shared in ("average", "replica0"):
            merged[key] = states[0][key].clone()          # integer counters (BN num_batches_tracked)
        else:
            merged[key] = value
    model.load_state_dict(merged)


def dense_fraction(partition_size: int, total: int, sparsity: float) -> float:
    """d_k = (N_k + (1 − s)(N − N_k)) / N: the training-MACs fraction of a phase growing P_k."""
    return (partition_size + (1.0 - sparsity) * (total - partition_size)) / total


# --- the method ----------------------------------------------------------------------------
OFFICIAL_ROUNDS = 10                                       # the official scripts' R
MIN_PHASE_STEPS = 20                                       # the fewest optimizer steps per phase the default R allows


def default_rounds(budget: int, kappa: int) -> int:
    """R = the official 10, lowered until each of the R·κ phases (P-GaP: of its R·κ replica
    phases) has at least MIN_PHASE_STEPS steps of the budget; at least 1."""
    return max(1, min(OFFICIAL_ROUNDS, budget // (kappa * MIN_PHASE_STEPS)))


@dataclass(frozen=True)
class GaPConfig:
    num_groups: int = 3                                    # κ (kappa), partitions
    rounds: Optional[int] = None                           # R, passes over all partitions; None: default_rounds
    partition: Literal["by_stage", "balanced_params", "random"] = "by_stage"
    init_mask: Literal["random", "magnitude_init"] = "random"
    distribution: Literal["uniform", "erk", "global"] = "uniform"   # per-layer sparsity of the masks
    prune_scope: Literal["layer", "global"] = "layer"      # prune-back criterion
    restart_optimizer: bool = True                         # fresh optimizer state every phase [official scripts]
    lr_restart: bool = True                                # a new LR schedule every phase (else one global cosine)
    skip_first: Optional[bool] = None                      # None: True (input layer dense), see resolve_skips
    skip_last: Optional[bool] = None
    faithful_masking: bool = False                         # official code: mask weights only
    merge_shared: Literal["average", "replica0", "fresh"] = "average"   # P-GaP tensors outside partitions
    pattern: Literal["none", "2:4"] = "none"               # 2:4 prune-back (not in the paper)
    regrow: bool = True                                    # False: the null control, static sparse training
    # "random": the signal control, prune-back by random scores (same counts) instead of |w|
    prune_scores: Literal["magnitude", "random"] = field(default="magnitude", metadata=OMITTED_AT_DEFAULT)

    def __post_init__(self):
        if self.num_groups < 1:
            raise ValueError(f"num_groups (κ) must be >= 1, got {self.num_groups}")
        if self.rounds is not None and self.rounds < 1:
            raise ValueError(f"rounds (R) must be >= 1, got {self.rounds}")


class _GaP(Method):
    granularity = "unstructured"
    starts_from = "scratch"
    Config = GaPConfig
    variant = ""
    null_control = {"regrow": False}
    signal_controls = {"random prune-back": {"prune_scores": "random"}}
    mechanism_thresholds = {"prune_backs": 1, "mean_changed": 0.01}

    def run(self, ctx: MethodContext) -> Outcome:
        cfg, s = self.config, ctx.target.value
        kappa = cfg.num_groups
        rounds = cfg.rounds if cfg.rounds is not None else default_rounds(ctx.budget.left, kappa)
        generator = torch.Generator().manual_seed(ctx.seed)
        skip_first, skip_last = resolve_skips(cfg.skip_first, cfg.skip_last)
        params = prunable_weights(ctx.model, exclude=ctx.dense_layers(skip_first, skip_last))
        replicas = kappa if self.variant == "parallel" else 1
        phase_steps = ctx.budget.left // (rounds * kappa)          # T; P-GaP: per replica
        if phase_steps < 1:
            raise SpecError(f"{self.name}: a budget of {ctx.budget.left} steps is too small for "
                            f"rounds·num_groups = {rounds * kappa} phases"
                            + (f" of {kappa} replicas" if replicas > 1 else ""))
        if cfg.partition == "random":
            if self.variant == "parallel":
                raise SpecError("partition='random' is cyclic-only: the P-GaP merge needs disjoint partitions")
            schedule = random_groups(params, kappa, rounds * kappa, generator)
        else:
            partitions = make_partitions(params, kappa, cfg.partition)
            schedule = [partitions[k] for _ in range(rounds) for k in range(kappa)]
        if cfg.pattern == "2:4":
            bad = [n for n, p in params.items() if p[0].numel() % GROUP]
            if bad:
                raise SpecError(f"pattern='2:4' needs input dims divisible by {GROUP}: {', '.join(bad)}")
        masks = MaskSet(ctx.model, initial_masks(params, s, cfg.distribution,
                                                 "magnitude" if cfg.init_mask == "magnitude_init" else "random",
                                                 generator), weights_only=cfg.faithful_masking)
        keep = masks.nnz()                                   # per-layer counts every prune-back restores
        total = sum(p.numel() for p in params.values())
        if not cfg.regrow:
            loop = self.static
        else:
            loop = self.parallel if self.variant == "parallel" else self.cyclic
        log = loop(ctx, masks, schedule, keep, phase_steps, generator)
        notes = {
            "variant": self.variant, "num_groups": kappa, "rounds": rounds, "phase_steps": phase_steps,
            "partitions": [list(p.blocks) or list(p.names) for p in schedule[:kappa]],
            "phases": [{**entry, "dense_fraction": dense_fraction(entry["grown_size"], total, s)} for entry in log],
            "steps_unused": ctx.budget.left, "skip_first": skip_first, "skip_last": skip_last,
            "layer_sparsity": masks.layer_sparsity(),
        }
        notes["mean_dense_fraction"] = sum(p["dense_fraction"] for p in notes["phases"]) / len(notes["phases"])
        # P-GaP's replicas could train side by side: its sequential depth is R·T steps for κ·R·T
        # optimizer steps in all (κ× the compute per sequential step); C-GaP and the control are sequential
        parallel = replicas > 1 and cfg.regrow
        notes["total_steps"] = len(log) * phase_steps
        notes["sequential_steps"] = rounds * phase_steps if parallel else notes["total_steps"]
        if replicas > 1:
            notes["replica_steps"] = rounds * kappa * phase_steps
            notes["compute"] = (f"{kappa} replicas trained one after another; optimizer steps = "
                                f"{kappa} x replica steps, all charged to the budget")
        changed = [round(e["changed"], 4) for e in log if "changed" in e]
        metrics = {"phases": len(log), "rounds": rounds if cfg.regrow else 0, "prune_backs": len(changed),
                   "changed": changed, "mean_changed": round(sum(changed) / len(changed), 4) if changed else 0.0}
        return Outcome(model=ctx.model, realization="masked", masks=masks, prunable=list(params), notes=notes,
                       mechanism=judge_mechanism(self, metrics), pattern=None if cfg.pattern == "none" else cfg.pattern)

    def _schedule(self, trainer, phase_steps: int, total_phases: int, elapsed: int) -> None:
        # one global cosine over all phases unless lr_restart (the Transformer scripts restart per phase)
        if self.config.lr_restart:
            trainer.restart_schedule(phase_steps)
        elif elapsed == 0 or trainer.schedule_steps is None:
            trainer.restart_schedule(total_phases * phase_steps, elapsed)

    def cyclic(self, ctx, masks, schedule, keep, phase_steps, generator) -> List[dict]:
        """C-GaP: grow P_k, train T steps, prune it back; rotate."""
        cfg, log = self.config, []
        trainer = ctx.make_trainer(hooks=[masks])

        def prune_back_and_measure(partition, before, entry):
            prune_back(masks, partition, keep, cfg.prune_scope, cfg.pattern, generator, trainer.optimizer,
                       criterion=cfg.prune_scores)
            entry["changed"] = kept_change(before, _snapshot(masks, partition))
            trainer.event("prune_back", phase=entry["phase"], changed=round(entry["changed"], 4))

        grown, before = None, None
        for i, partition in enumerate(schedule):
            if grown is not None:
                prune_back_and_measure(grown, before, log[-1])
            before = _snapshot(masks, partition)
            grow(masks, partition, trainer.optimizer)
            trainer.event("grow", phase=i, size=partition.size)
            if cfg.restart_optimizer:
                trainer.reset_optimizer()
            self._schedule(trainer, phase_steps, len(schedule), i * phase_steps)
            trainer.phase(f"gap-grow:{i}")
            trainer.fit(phase_steps, progress=ctx.progress, desc=f"gap phase {i}")
            log.append({"round": i // cfg.num_groups, "phase": i, "grown": list(partition.names),
                        "grown_size": partition.size, "steps": phase_steps})
            grown = partition
        prune_back_and_measure(grown, before, log[-1])
        return log

    def static(self, ctx, masks, schedule, keep, phase_steps, generator) -> List[dict]:
        """The null control: the initial masks trained, fixed, for as many optimizer steps as
        the phases take (R·κ·T; P-GaP's κ replicas take as many), phase by phase with the same
        learning-rate schedule and optimizer restarts as the method (`lr_restart`,
        `restart_optimizer`), so only the regrowth differs."""
        trainer = ctx.make_trainer(hooks=[masks])
        for i in range(len(schedule)):
            if self.config.restart_optimizer:
                trainer.reset_optimizer()
            self._schedule(trainer, phase_steps, len(schedule), i * phase_steps)
            trainer.fit(phase_steps, progress=ctx.progress, desc=f"gap static phase {i}")
        return [{"round": i // self.config.num_groups, "phase": i, "grown": [], "grown_size": 0, "steps": phase_steps}
                for i in range(len(schedule))]

    def parallel(self, ctx, masks, schedule, keep, phase_steps, generator) -> List[dict]:
        """P-GaP: κ replicas grow different partitions from the same model; merge; prune back."""
        cfg, log = self.config, []
        kappa = cfg.num_groups
        partitions, rounds = schedule[:kappa], len(schedule) // kappa
        for r in range(rounds):
            replicas = []
            for k, partition in enumerate(partitions):
                replica = copy.deepcopy(ctx.model)
                replica_masks = MaskSet(replica, {n: m.clone() for n, m in masks.masks.items()},
                                        weights_only=cfg.faithful_masking)
                trainer = ctx.make_trainer(replica, hooks=[replica_masks])   # a fresh optimizer per replica
                grow(replica_masks, partition, trainer.optimizer)
                trainer.event("grow", phase=r * kappa + k, size=partition.size)
                self._schedule(trainer, phase_steps, rounds, r * phase_steps)
                trainer.phase(f"gap-grow:{r}:{k}")
                trainer.fit(phase_steps, progress=ctx.progress, desc=f"gap round {r} replica {k}")
                log.append({"round": r, "phase": r * kappa + k, "replica": k, "grown": list(partition.names),
                            "grown_size": partition.size, "steps": phase_steps})
                replicas.append(replica)
            before = [_snapshot(masks, partition) for partition in partitions]
            for partition in partitions:
                grow(masks, partition, None)              # unmask first: merged weights must not be zeroed
            merge_replicas(ctx.model, replicas, partitions, cfg.merge_shared)
            for k, partition in enumerate(partitions):
                prune_back(masks, partition, keep, cfg.prune_scope, cfg.pattern, generator, criterion=cfg.prune_scores)
                entry = log[len(log) - kappa + k]
                entry["changed"] = kept_change(before[k], _snapshot(masks, partition))
                ctx.curve.add_event(ctx.budget.used, "prune_back", phase=entry["phase"],
                                    changed=round(entry["changed"], 4))
        return log


@register_method("gap-cyclic")
class CyclicGaP(_GaP):
    """C-GaP (Ma et al. 2022): partitions grown dense and pruned back in turn, R rounds."""

    variant = "cyclic"


@register_method("gap-parallel")
class ParallelGaP(_GaP):
    """P-GaP (Ma et al. 2022): κ replicas grow different partitions, merged and pruned back."""

    variant = "parallel"
