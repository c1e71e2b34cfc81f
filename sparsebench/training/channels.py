"""Shared channel machinery: groups, masks, a closed-form FLOPs model, and compaction.

`ChannelSpace` asks torch-pruning's `DependencyGraph` which output channels must be removed
together (a conv, its BN, the next layer's inputs, every member of a residual stream,
depthwise convs tied to their inputs). A method only *scores* channels and picks kept
index sets; this module keeps the masked model equivalent to the compacted one and does
the physical removal, so no method carries its own channel surgery.

Residual modes:
- "coupled": every group the dependency graph finds, residual streams included;
- "internal": only groups with a single producing conv (block-internal channels), so
  residual-stream widths stay fixed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from sparsebench.errors import SpecError

RESIDUAL_MODES = ("coupled", "internal")


def _tp():
    """torch-pruning, imported on first use (it is slow to import)."""
    from sparsebench.measure.latency import quiet_cpp_extension_logger

    quiet_cpp_extension_logger()
    import torch_pruning

    return torch_pruning
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
_LAYERS = (nn.Conv2d, nn.Linear)


def classifier_layers(model: nn.Module) -> List[nn.Module]:
    """The last Linear layer: its outputs are the classes and are never pruned."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


@dataclass
class ChannelGroup:
    index: int
    root: str                       # conv whose output channels name the group
    size: int                       # channels in the dense model
    out_members: List[str]          # modules whose outputs carry the channels
    in_members: List[str]           # modules whose inputs consume them
    mask_points: List[str] = field(default_factory=list)   # outputs multiplied by the mask

    def as_dict(self) -> dict:
        return {"root": self.root, "size": self.size}


@dataclass
class _LayerCost:
    name: str
    positions: int                  # output pixels (or tokens) per image
    kernel: int                     # kernel elements per (in, out) pair
    groups: int
    cin: int
    cout: int
    in_group: Optional[int]
    out_group: Optional[int]
    depthwise: bool


class UnitSpace:
    """Groups of prunable units (channels, heads, neurons) with an exact closed-form MACs model.

    Subclasses set `groups` (each with a `.size`), `dense_macs`, and implement
    `macs(keep)`, `apply_masks`, `compact` and `structure`. Selection under a FLOPs
    budget is shared here.
    """

    groups: list
    dense_macs: int
    floor_name: str = "min_channels"

    def macs(self, keep: Sequence[int]) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def gate_hooks(self, model: nn.Module, gates) -> List[torch.utils.hooks.RemovableHandle]:
        """Forward hooks scaling each unit by `gates.values[g]` (read at call time)."""
        raise NotImplementedError

    def gate(self, model: nn.Module):
        """Differentiable per-unit gates on `model` (see `training.gates.UnitGates`)."""
        from sparsebench.training.gates import UnitGates

        return UnitGates(self, model)

    def check_compaction(self, model: nn.Module, kept: Sequence[torch.Tensor], compact: nn.Module,
                         x: torch.Tensor, tolerance: float = 1e-4, via: str = "masks") -> float:
        """max |masked(x) − compacted(x)| in eval mode; raises if above `tolerance` × max(1, max |masked(x)|).

        A fast wrong model is a bug, not a speedup: every compaction is checked before it is
        fine-tuned or timed. The bound scales with the outputs' size, since fp32 summation order
        alone differs by ~1e-7 of it (a VGG barely trained, in eval mode, gives logits of 1e4).
        `via="masks"` emulates the kept sets with fixed masks, `via="gates"` with binary gates on
        the gating path; both must agree with `compact`.
        """
        if via not in ("masks", "gates"):
            raise ValueError(f"via must be 'masks' or 'gates', got {via!r}")
        modes = (model.training, compact.training)
        model.eval()
        compact.eval()
        if via == "masks":
            handles = self.apply_masks(model, kept)
        else:
            gates = self.gate(model)
            gates.set([k.to(torch.float32).to(x.device) for k in kept])
            handles = [gates]
        try:
            with torch.inference_mode():
                masked = model(x)
                error = float((masked - compact(x)).abs().max())
                scale = max(1.0, float(masked.abs().max()))
        finally:
            for h in handles:
                h.remove()
            model.train(modes[0])
            compact.train(modes[1])
        if error != error:
            raise ValueError("the compaction check produced NaN: the masked model's outputs are not finite "
                             "(a diverged model cannot be compacted)")
        if not error < tolerance * scale:
            raise AssertionError(f"compacted model differs from the masked one by {error:.2e} "
                                 f"(> {tolerance:g} x max(1, max |output|) = {tolerance * scale:.2e})")
        return error

    # --- selection under a FLOPs budget --------------------------------------------------
    def select(self, scores: Sequence[torch.Tensor], flops_ratio: float, scope: str = "uniform",
               min_units: int = 1) -> List[torch.Tensor]:
        """Kept-channel masks meeting `macs <= flops_ratio × dense`, as close to it as channels allow.

        `uniform`: one keep ratio for every group, found by bisection; `global`: one score
        threshold across groups. Both end with a greedy fill that adds the best-scored
        pruned channels while the budget holds (without it, coarse channel counts
        undershoot the target badly on small nets).
        """
        if scope not in ("uniform", "global"):
            raise SpecError(f"unknown pruning scope {scope!r}; allowed: uniform, global")
        budget = flops_ratio * self.dense_macs
        floor = [min(min_units, g.size) for g in self.groups]
        if self.macs(floor) > budget:
            reachable = self.macs(floor) / self.dense_macs
            raise SpecError(f"flops={flops_ratio:g} is below the floor reachable here ({reachable:.3f}) "
                            f"with {self.describe()} and {self.floor_name}={min_units}")
        order = [torch.argsort(s, descending=True, stable=True) for s in scores]

        def counts_at(x: float) -> List[int]:
            if scope == "uniform":
                return [max(f, min(g.size, int(x * g.size))) for f, g in zip(floor, self.groups)]
            return [max(f, int((s > x).sum())) for f, s in zip(floor, scores)]

        if scope == "uniform":
            lo, hi = 0.0, 1.0                                  # keep ratio: larger keeps more
        else:
            flat = torch.cat([s.flatten() for s in scores])
            lo, hi = float(flat.max()) + 1.0, float(flat.min()) - 1.0   # threshold: lower keeps more
        for _ in range(60):
            mid = (lo + hi) / 2
            if self.macs(counts_at(mid)) <= budget:
                lo = mid
            else:
                hi = mid
        keep = counts_at(lo)
        keep = self._greedy_fill(keep, scores, order, budget)
        masks = []
        for k, o, g in zip(keep, order, self.groups):
            m = torch.zeros(g.size, dtype=torch.bool)
            m[o[:k]] = True
            masks.append(m)
        return masks

    def _greedy_fill(self, keep, scores, order, budget) -> List[int]:
        keep = list(keep)
        candidates = []
        for gi, (s, o) in enumerate(zip(scores, order)):
            for pos in range(keep[gi], len(o)):
                candidates.append((float(s[o[pos]]), gi, pos))
        # channels of a group must be added in its own score order: sort by score, then position
        candidates.sort(key=lambda c: (-c[0], c[2]))
        for _, gi, pos in candidates:
            if pos != keep[gi]:
                continue
            keep[gi] += 1
            if self.macs(keep) > budget:
                keep[gi] -= 1
        return keep



class ChannelSpace(UnitSpace):
    def __init__(self, model: nn.Module, input_size: Sequence[int], residual_mode: str = "coupled",
                 ignored: Optional[List[nn.Module]] = None):
        if residual_mode not in RESIDUAL_MODES:
            raise SpecError(f"unknown residual_mode {residual_mode!r}; allowed: {', '.join(RESIDUAL_MODES)}")
        self.input_size = tuple(input_size)
        self.residual_mode = residual_mode
        names = {m: n for n, m in model.named_modules()}
        example = torch.zeros(1, *input_size, device=next(model.parameters()).device)
        was_training = model.training
        model.eval()
        tp = _tp()
        graph = _dependency_graph(tp, model, example)
        ignored = list(ignored if ignored is not None else classifier_layers(model))
        self.groups: List[ChannelGroup] = []
        for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=list(_LAYERS)):
            outs, ins = [], []
            for dep, _ in group:
                name = names.get(dep.target.module)
                if name is None:
                    continue                 # functional node (add, flatten, activation)
                (outs if graph.is_out_channel_pruning_fn(dep.handler) else ins).append(name)
            outs, ins = list(dict.fromkeys(outs)), list(dict.fromkeys(ins))
            root = names[group[0][0].target.module]
            producers = [n for n in outs if isinstance(model.get_submodule(n), _LAYERS)
                         and not _is_depthwise(model.get_submodule(n))]
            if residual_mode == "internal" and len(producers) != 1:
                continue
            size = graph.get_out_channels(group[0][0].target.module)
            self.groups.append(ChannelGroup(len(self.groups), root, size, outs, ins))
        for g in self.groups:
            g.mask_points = _mask_points(model, graph, g)
        self._layers = self._layer_costs(model, example)
        model.train(was_training)
        from sparsebench.measure.flops import count_macs

        # Everything the groups do not change (attention matmuls, unpruned layers) is fixed.
        self.dense_macs = count_macs(model, self.input_size).macs
        self.fixed_macs = self.dense_macs - self._layer_macs([g.size for g in self.groups])

    # --- closed-form FLOPs model -------------------------------------------------------
    def _layer_costs(self, model: nn.Module, example: torch.Tensor) -> List[_LayerCost]:
        out_of = {n: g.index for g in self.groups for n in g.out_members}
        in_of = {n: g.index for g in self.groups for n in g.in_members}
        shapes: Dict[str, torch.Size] = {}       # insertion order = the order the layers execute
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, o.shape))
                 for n, m in model.named_modules() if isinstance(m, _LAYERS)]
        with torch.no_grad():
            model(example)
        for h in hooks:
            h.remove()
        self._executed = {name: i for i, name in enumerate(shapes)}
        layers = []
        for name, m in model.named_modules():
            if not isinstance(m, _LAYERS) or name not in shapes:
                continue
            shape = shapes[name]
            if isinstance(m, nn.Conv2d):
                positions, kernel, groups = shape[-1] * shape[-2], m.kernel_size[0] * m.kernel_size[1], m.groups
                cin, cout = m.in_channels, m.out_channels
            else:
                positions, kernel, groups = int(torch.tensor(shape[1:-1]).prod()) if len(shape) > 2 else 1, 1, 1
                cin, cout = m.in_features, m.out_features
            layers.append(_LayerCost(name, positions, kernel, groups, cin, cout,
                                     in_of.get(name), out_of.get(name), _is_depthwise(m)))
        return layers

    def macs(self, keep: Sequence[int]) -> int:
        """MACs of the model compacted to `keep[g]` channels per group (exact for conv/linear).

        `keep` may hold soft counts (tensors, e.g. the sum of soft gates): the result is then a
        differentiable estimate (PASS's FLOPs regulariser)."""
        return self.fixed_macs + self._layer_macs(keep)

    def _layer_macs(self, keep: Sequence[int]) -> int:
        """MACs of the conv/linear layers whose inputs or outputs the groups touch."""
        total = 0
        for layer in self._layers:
            cout = keep[layer.out_group] if layer.out_group is not None else layer.cout
            cin = keep[layer.in_group] if layer.in_group is not None else layer.cin
            if layer.depthwise:
                total += layer.positions * layer.kernel * cout
            else:
                # groups == 1 avoids integer division, so soft (tensor) counts stay differentiable
                per_group = cin if layer.groups == 1 else cin // layer.groups
                total += layer.positions * layer.kernel * per_group * cout
        return total

    def forward_order(self) -> List[int]:
        """Group indices in the order the network executes them: by the forward-execution index
        of each group's first producing conv/linear (traced with hooks on one dummy input).

        `groups` keeps torch-pruning's listing order (records, compaction and saved
        signatures read it); that order is not the network's (VGG comes out last layer first,
        coupled ResNets list the residual streams in reverse before the internal layers), so
        code that walks layer by layer (PASS's recurrent hypernetwork) asks for this order."""
        never = len(self._executed)

        def first_producer(g: ChannelGroup) -> int:
            ran = [self._executed[n] for n in g.out_members if n in self._executed]
            return min(ran) if ran else never

        return sorted(range(len(self.groups)), key=lambda i: (first_producer(self.groups[i]), i))

    # --- masks and compaction ---------------------------------------------------------------
    def apply_masks(self, model: nn.Module, masks: Sequence[torch.Tensor]) -> List[torch.utils.hooks.RemovableHandle]:
        """Forward hooks that zero pruned channels where they are produced (after the norm)."""
        handles = []
        for g, mask in zip(self.groups, masks):
            for point in g.mask_points:
                module = model.get_submodule(point)

                def hook(mod, inputs, output, mask=mask):
                    shape = [1, -1] + [1] * (output.dim() - 2)
                    return output * mask.to(output.dtype).view(shape)

                handles.append(module.register_forward_hook(hook))
        return handles

    def gate_hooks(self, model: nn.Module, gates) -> List[torch.utils.hooks.RemovableHandle]:
        """Gates multiply a group's channels where its masks would zero them (after the norm)."""
        handles = []
        for gi, g in enumerate(self.groups):
            for point in g.mask_points:
                def hook(mod, inputs, output, gi=gi):
                    gate = gates.values[gi]
                    if gate is None:
                        return None
                    shape = [1, -1] + [1] * (output.dim() - 2)
                    return output * gate.to(output.dtype).view(shape)

                handles.append(model.get_submodule(point).register_forward_hook(hook))
        return handles

    def compact(self, model: nn.Module, masks: Sequence[torch.Tensor]) -> nn.Module:
        """Physically remove unmasked channels through torch-pruning; returns a pruned deep copy."""
        model = copy.deepcopy(model)
        was_training = model.training
        model.eval()
        example = torch.zeros(1, *self.input_size, device=next(model.parameters()).device)
        tp = _tp()
        graph = _dependency_graph(tp, model, example)
        for g, mask in zip(self.groups, masks):
            pruned = torch.nonzero(~mask).flatten().tolist()
            if not pruned:
                continue
            root = model.get_submodule(g.root)
            handler = tp.prune_linear_out_channels if isinstance(root, nn.Linear) else tp.prune_conv_out_channels
            graph.get_pruning_group(root, handler, idxs=pruned).prune()
        model.train(was_training)
        return model

    def describe(self) -> str:
        return f"residual_mode={self.residual_mode!r}"

    def structure(self, masks: Sequence[torch.Tensor]) -> dict:
        return {
            "residual_mode": self.residual_mode,
            "groups": [{"root": g.root, "size": g.size, "kept": int(m.sum())} for g, m in zip(self.groups, masks)],
        }


def _dependency_graph(tp, model: nn.Module, example: torch.Tensor):
    """torch-pruning's graph of `model`, also when its parameters are frozen: the graph is
    traced through autograd and silently finds no groups for parameters without grad."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example)
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _mask_points(model: nn.Module, graph, group: ChannelGroup) -> List[str]:
    """Where to zero a group's channels so the masked model equals the compacted one.

    A channel produced by conv → norm must be zeroed at the norm's output (a zeroed conv
    output still gets the norm's bias), so a conv/linear whose output feeds a norm of the
    same group is masked through that norm (the graph says who feeds whom).
    """
    names = {m: n for n, m in model.named_modules()}
    norms = [n for n in group.out_members if isinstance(model.get_submodule(n), _NORMS)]
    fed_norms = set()
    for n in norms:
        for producer in graph.module2node[model.get_submodule(n)].inputs:
            fed_norms.add(names.get(producer.module))
    points = list(norms)
    for n in group.out_members:
        if isinstance(model.get_submodule(n), _LAYERS) and n not in fed_norms:
            points.append(n)
    return points
