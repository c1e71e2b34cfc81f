"""PASS (Huang et al., "Visual Prompt Locates Good Structure Sparsity through a Recurrent
HyperNetwork", arXiv 2407.17412): a visual prompt and per-layer weight statistics drive an
LSTM hypernetwork that steps through the network and scores every channel; a global
ranking under the FLOPs budget turns the scores into masks.

    search (backbone frozen, BN in eval), for each step:
        every k steps: adaptive BN under the current masks (forward passes only)
        (h0, c0) = g_ω(V ⊙ B_p)                          prompt encoder sets the LSTM state
        for unit i = 1..L in forward-execution order:
            z_i = [E_i(s_i) ; A_i(σ(r_{i-1}/T))]          weight statistics + previous scores
            (h_i, c_i) = LSTMCell(z_i, (h_{i-1}, c_{i-1}))
            r_i = α·b_i + P_i(h_i) + o_i                  channel scores: prior + learned part
        m = global_threshold(r, ρ)                       hard masks under the FLOPs budget
        m ← m + σ((r − τ)/T) − sg(σ((r − τ)/T))           straight-through
        L = CE(f(prompt(x); W ⊙ M), y) [+ λ·|log(F̂/ρF)|]  → Adam on θ, ω (lr) and V (prompt_lr)
    extraction: one deterministic forward → masks → compacted CNN → harness fine-tune

There is no public code. Every record says `faithfulness: "reconstruction"`; the choices
below follow /work/shared/specs/pass.md (with its amendments after the first measurements),
where [paper] items come from the abstract and public reviews, [VPNs] from the authors'
sibling project UNITES-Lab/VPNs, and the rest is ours. Reconstructed here, with the reason:

- prompt [VPNs]: a pad prompt, a learnable V ∈ ℝ^{C×H×W} visible only on a border of width p
  (default min(16, H//8): 16 at 224 px as in VPNs, 4 at 32 px), added in pixel space and
  clamped to [0, 1]; the harness hands normalised tensors, so `PadPrompt` de-normalises,
  adds, clamps and re-normalises. V starts at N(0, 0.01²): the search starts from almost the
  unprompted model (VPNs' N(0, 1) would shift the frozen backbone's inputs), and not from
  exactly zero, which would give g_ω's first conv no gradient until V moves.
- weight statistics: per-channel ‖W‖₂ (summed over a coupled group's producers), z-scored
  within the group; options ‖W‖₁, |γ_BN|, or all three. Computed once: the backbone is frozen.
  `quantile` [spec §5]: the three statistics pooled to 16 sorted quantiles per layer, read by
  one shared E; A reads the 16 quantiles of σ(r_{i−1}/T), and one shared head maps h_i to a
  weight per statistic and a shift (learned part of channel j = w(h_i)·s_i[j] + c(h_i), no
  per-channel offsets), so nothing is shape-bound and a saved hypernetwork transfers across
  architectures (with per-channel heads, P_i is bound to C_i).
- network order [spec amendment]: the LSTM steps through the units in forward-execution
  order (`ChannelSpace.forward_order`: the first producing conv of each group, traced on a
  dummy input), not torch-pruning's group listing, which runs VGG last layer first and
  lists a coupled ResNet's residual streams in reverse before its internal layers; the
  "previous unit" of the recurrence is then the previous layer. Scores are handed back in
  the space's group order.
- encoder g_ω: strided 3×3 convs + global pool + Linear(·, 2d), split into (h0, c0).
- hypernetwork: LSTMCell(2d, d); its input concatenates E_i(s_i) with A_i(σ(r_{i−1}/T)), a
  soft feedback of the previous unit's scores (autoregressive). b_i = s_i (a fixed buffer;
  the learned part is P_i(h_i) + o_i, so a transferred hypernetwork lands on the target
  model's own statistics): the search starts at the global magnitude ranking. P_i's weights
  start ×0.01 and its bias at 0, so the selection at step 0 is the prior's, yet gradients
  reach the LSTM, E_i, ω and V from the first step. There is no fixed damping of the learned
  part [spec amendment]: Adam's step size does not depend on the init scale, and the learned
  part moves about lr·d per step. `prior_final` < 1 anneals the prior weight α linearly from
  1 to that value over the search (default 1: no annealing; the learned part moves units
  across the threshold without it within the quick budget, see below).
- masks: the global threshold with bisection and greedy fill (`ChannelSpace.select`, exact
  closed-form MACs) gives the hard masks at every step and at extraction; τ for the soft
  gate is the midpoint between the lowest kept and the highest pruned score.
- adaptive BN [spec amendment]: with channels masked and BN frozen at the dense statistics,
  the masked network scores at chance (9.6 % val on resnet20_tiny/digits at FLOPs 0.5) and
  the search loss says "repair BN" rather than "which channels matter". Every `bn_every`
  steps (from step 0) the hook recalibrates every BN layer's running statistics under the
  current hard masks: `bn_batches` train batches (prompted, as the search sees them) in
  train mode with momentum None (a cumulative average), no gradient, weights untouched; the
  forward MACs count as search cost (`Trainer.add_macs`), and each recalibration is a
  `bn_recalibration` event (images, channels flipped since the last one, masked val top-1).
  The extracted model keeps the *dense* BN statistics: l1-channel and the null control
  start their fine-tune from the dense statistics too, so the comparison differs only in
  which channels are kept (the harness's fine-tune re-estimates BN anyway).
- loss: cross-entropy only by default (λ = 0: the projection already meets the budget);
  `lambda_flops` > 0 adds λ·|log(F̂/ρF)| with F̂ the closed-form MACs at soft counts.
- optimiser: Adam(W) without weight decay, the harness's warm-up + cosine schedule over the
  method's step budget; `lr` (θ, ω) and `prompt_lr` (V) are separate knobs, both 3e-3 by
  default, set for the suites' search of 2 epochs (38 steps on digits at batch 64). At
  1e-3 over 19 steps the learned part moved 0.09 z-units and changed 6 of 112 channels (and
  turning the prompt off selected the same channels); at 1e-2 it moved ~1 z-unit, Adam's
  sign-like steps then mostly add noise, and the search loss rose (resnet20_tiny, FLOPs 0.5).
- null control [spec amendment] `search=False`: the prior alone (the same statistics, the
  same selection code and fill, the same fine-tune), no search steps.
- signal control `labels="shuffled"`: the same search, every step's targets permuted within
  the batch by a generator seeded from the run's seed, so the labels keep their class
  frequencies and lose their link to the images; what it tests is whether the task drives the
  selection (see "What the verdict does not show" below). Also the sanity checks of pruning from
  a pretrained model (`training.sanity`): `sanity="shuffle"`, the searched widths with the kept
  channels drawn at random within each group; `sanity="reinit"`, the searched structure
  re-initialised and trained from scratch for the dense pretrain + fine-tune steps.
- residual handling [spec]: `"internal"` (default) prunes block-internal channels only, so
  residual-stream widths stay fixed; `"coupled"` gives each dependency group (a residual
  stream with every conv writing to it) one LSTM step, one statistic (summed over its
  producers) and one shared mask. The l1-channel control defaults to `coupled`: compare at
  the same `residual_mode` and `scope` (the suites run PASS coupled and global, beside
  l1-channel at scope global and uniform); the record stores both. Internal-only pruning
  has a high FLOPs floor on some nets (0.62 on resnet50_tiny), below which the run stops
  with one clear error.
- `keep_prompt` (default False): the deployed model is then a plain compacted CNN. True
  attaches the prompt to the compacted model as an input operation; its C·H·W additions
  per image are element-wise and excluded from MACs by convention (recorded in the notes).
- `recurrent=False` (ablation): an independent per-layer MLP on [E_i(s_i); h0] replaces the
  LSTM (no feedback); `use_prompt=False`: g_ω sees zeros and inputs stay unprompted.

Mechanism (the record's `mechanism`, thresholds in `mechanism_thresholds`): the search
acted when the extracted selection differs from the prior's (the same selection code on the
statistics alone) in at least 10 % of the channels (`units_changed_fraction`, counting
channels kept by one and pruned by the other) and the learned part of the scores moved at
least 0.20 z-units on average from its value at step 0 (`score_change_mean`). The
configuration the review measured (5 % of the channels, 0.09 z-units) fails both. Telemetry
also gives the largest score change, the visible prompt's norm and max |V|, the search loss
(mean of the first and last 10 % of steps), and the masked validation top-1: with the prior's
masks and dense BN (`masked_val_top1_frozen_bn`), right after about 8 evenly spaced
recalibrations during the search (prompted; also the curve's `masked_val_top1`), and at the
end for the searched and the prior's masks, each with BN recalibrated on the same 8 train
batches and no prompt (`masked_val_top1_searched`, `masked_val_top1_prior`).

Measured (resnet20_tiny, digits, coupled, global, 38 search steps): the search acts at FLOPs
0.5, 0.3 and 0.25, but the searched structure is not better than the prior's; at 0.25 it is
worse, and below random channels (benchmarks/evidence/pass-aggressive.yaml, docs/evidence.md).
There the frozen masked network scores at chance even with adaptive BN (the prior's masks:
val top-1 0.10–0.21 on 10 classes), so the search loss carries no information about which
channels to keep: the search on shuffled labels ends where the true-label search does or
better, a 3× longer search ends lower, and the channels it moves narrow the last stage, which
the fine-tune cannot repair. The record's verdict says so (`at_chance_note`). `budget_ramp`
(the budget falling from 1 to ρ over part of the search) keeps the network working while ρ is
high, but then the search moves fewer channels and ends near the prior.

What the verdict does not show: that the search moves the selection *because of the task*.
An independent check ran the search on randomly permuted labels (same dense checkpoint, seeds
3, 4, hypernetwork seed 13): it passes both thresholds too (0.21–0.38 of the channels, i.e.
about half as many moved, since a swap counts twice; 0.51–1.03 z-units), and the consistent
part of the score changes correlates as well with the random-label search as with a second
true-label search (r ≈ 0.5–0.8). So `acted` says the prompt and hypernetwork changed the
structure (an lr of 1e-9 gives 0 and 0, "did not act"), not that they found a better one:
that is the paired comparison with the null control (`Δ control` in the leaderboard).
Also: a residual stream's position in the forward order is its first producer's, so in a
block whose `downsample` runs before `conv1` the stream precedes that block's `conv1`; the
encoder and hypernetwork sizes (`hidden=64`, `encoder_channels=(16, 32)`) are the spec's
paper-scale values, not its tiny column (16, (8, 16)).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from sparsebench.errors import SpecError
from sparsebench.training.channels import ChannelSpace
from sparsebench.training.gates import straight_through
from sparsebench.training.importance import MagnitudeImportance
from sparsebench.training.masks import prunable_weights
from sparsebench.training.trainer import TrainerHook, evaluate
from sparsebench.methods.base import (
    OMITTED_AT_DEFAULT, SANITY_CONTROLS, Method, MethodContext, Outcome, judge_mechanism, register_method,
    sanity_field,
)
from sparsebench.training.sanity import shuffle_within_layers

HYPERNET_FORMAT = "sparsebench-pass-hypernet/2"     # /2: units stepped in forward-execution order
FINAL_BN_BATCHES = 8                                  # telemetry: BN batches when comparing searched and prior masks
VAL_POINTS = 8                                        # telemetry: masked val measurements per search (about)
QUANTILES = 16                                        # stats="quantile": values per pooled statistic


def input_normalisation(ctx: MethodContext) -> Tuple[Sequence[float], Sequence[float]]:
    """(mean, std) the harness normalised inputs with: the one place PASS reads it.

    Today it comes from the dataset's `DatasetInfo`; when `MethodContext` carries a model card
    with the model's input mean/std, switch here (the prompt lives in the pixel space the
    normalisation maps from)."""
    info = ctx.data_info
    if info is None:
        raise SpecError("pass needs the input normalisation (MethodContext.data_info) to place its prompt in "
                        "pixel space")
    return tuple(info.mean), tuple(info.std)


# --- the prompt ---------------------------------------------------------------------------
class PadPrompt(nn.Module):
    """V ⊙ B_p added to the image in pixel space, clamped to [0, 1] (VPNs' pad prompter)."""

    def __init__(self, input_size: Sequence[int], pad: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        c, h, w = input_size
        if not 0 < 2 * pad < min(h, w):
            raise SpecError(f"pad_size={pad} must leave an interior in a {h}x{w} input; allowed: 1..{(min(h, w) - 1) // 2}")
        self.pad = pad
        self.prompt = nn.Parameter(torch.randn(c, h, w) * 0.01)
        border = torch.ones(c, h, w)
        border[:, pad:h - pad, pad:w - pad] = 0
        self.register_buffer("border", border, persistent=False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(c, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(c, 1, 1), persistent=False)

    def visible(self) -> torch.Tensor:
        return self.prompt * self.border

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The prompted image in pixel space, in [0, 1]."""
        return (x * self.std + self.mean + self.visible()).clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.pixels(x) - self.mean) / self.std


def _apply_input_prompt(module: nn.Module, args):
    return (module.input_prompt(args[0]), *args[1:])


def attach_prompt(model: nn.Module, prompt: PadPrompt) -> nn.Module:
    """`model` with `prompt` applied to its input (keep_prompt=True).

    The prompt joins as the submodule `input_prompt`, applied by a forward pre-hook, rather
    than as an outer wrapper: the compacted backbone keeps its parameter names, which the
    harness's sparsity count reads against the dense model."""
    model.add_module("input_prompt", prompt)
    model.register_forward_pre_hook(_apply_input_prompt)
    return model


# --- the hypernetwork ---------------------------------------------------------------------
class PromptEncoder(nn.Module):
    """g_ω: strided convs over the visible prompt → (h0, c0) of the LSTM."""

    def __init__(self, in_chans: int, channels: Sequence[int], hidden: int):
        super().__init__()
        layers, c = [], in_chans
        for width in channels:
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1), nn.ReLU()]
            c = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.state = nn.Linear(c, 2 * hidden)

    def forward(self, visible_prompt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h0, c0 = self.state(self.features(visible_prompt)).chunk(2, dim=1)
        return h0, c0


def quantile_pool(x: torch.Tensor, n: int) -> torch.Tensor:
    """The n evenly spaced quantiles (0 … 1) of each column of x (C × k) → (n·k,): a layer's
    statistics as a fixed-size vector, whatever its width."""
    levels = torch.linspace(0, 1, n, device=x.device)
    return torch.quantile(x.reshape(x.shape[0], -1).float(), levels, dim=0).t().flatten()


class RecurrentHyperNetwork(nn.Module):
    """θ: E_i (statistics → d), A_i (previous scores → d), an LSTMCell (or per-layer MLPs),
    P_i (d → C_i) and the learned score offsets o_i; units come in forward-execution order.

    r_i = α·b_i + P_i(h_i) + o_i: b_i the statistics prior, α = `prior_weight` (1 unless the
    search anneals it), P_i(h_i) + o_i the learned part.

    `quantiles` = n > 0 (stats="quantile"): nothing is shape-bound. One shared E reads each
    layer's statistics pooled to n sorted quantiles per column, one shared A the n quantiles
    of σ(r_{i−1}/T), and one shared head maps h_i to a weight per statistic and a shift, so
    the learned part of channel j is w(h_i)·s_i[j] + c(h_i) (no per-channel offsets): a saved
    hypernetwork then transfers across architectures."""

    def __init__(self, stats: List[torch.Tensor], bias_init: List[torch.Tensor], hidden: int,
                 recurrent: bool = True, feedback: bool = True, temperature: float = 0.5,
                 head_init_scale: float = 0.01, quantiles: int = 0):
        super().__init__()
        sizes = [s.shape[0] for s in stats]
        columns = stats[0].shape[1]
        self.recurrent, self.feedback, self.temperature = recurrent, feedback and recurrent, temperature
        self.quantiles = quantiles
        if quantiles:
            self.embed = nn.Linear(quantiles * columns, hidden)                                   # E (shared)
            self.previous = nn.Linear(quantiles, hidden)                                          # A (shared)
            self.heads = nn.Linear(hidden, columns + 1)                                           # P (shared)
            heads = [self.heads]
        else:
            self.embed = nn.ModuleList(nn.Linear(s.numel(), hidden) for s in stats)               # E_i
            self.previous = nn.ModuleList(nn.Linear(c, hidden) for c in sizes[:-1])              # A_i
            self.heads = nn.ModuleList(nn.Linear(hidden, c) for c in sizes)                      # P_i
            self.offsets = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in sizes)        # o_i
            heads = list(self.heads)
        if recurrent:
            self.cell = nn.LSTMCell(2 * hidden, hidden)
        else:
            self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh()) for _ in sizes)
        with torch.no_grad():
            # the learned part starts near 0 (the search starts at the prior's ranking) but not
            # at exactly 0, so gradients reach the LSTM, E_i, ω and V from the first step; Adam's
            # step size does not depend on this scale, so it damps nothing after step one
            for head in heads:
                head.weight.mul_(head_init_scale)
                head.bias.zero_()
        for i, (s, b) in enumerate(zip(stats, bias_init)):
            # statistics belong to the model being pruned, not to a saved hypernetwork
            embedded = quantile_pool(s, quantiles) if quantiles else s.flatten()
            self.register_buffer(f"stats_{i}", embedded.float(), persistent=False)
            self.register_buffer(f"units_{i}", s.float(), persistent=False)
            self.register_buffer(f"stats_bias_{i}", b.float(), persistent=False)
        self.sizes = sizes
        self.prior_weight = 1.0

    def prior(self) -> List[torch.Tensor]:
        return [getattr(self, f"stats_bias_{i}") for i in range(len(self.sizes))]

    def _embed(self, i: int) -> torch.Tensor:
        embed = self.embed if self.quantiles else self.embed[i]
        return embed(getattr(self, f"stats_{i}"))[None]

    def _head(self, i: int, out: torch.Tensor) -> torch.Tensor:
        if self.quantiles:
            w = self.heads(out)[0]
            return getattr(self, f"units_{i}") @ w[:-1] + w[-1]
        return self.heads[i](out)[0] + self.offsets[i]

    def _feedback(self, i: int, r: torch.Tensor) -> torch.Tensor:
        soft = torch.sigmoid(r / self.temperature)
        if self.quantiles:
            return self.previous(quantile_pool(soft[:, None], self.quantiles))[None]
        return self.previous[i](soft)[None]

    def learned(self, state: Tuple[torch.Tensor, torch.Tensor]) -> List[torch.Tensor]:
        """The learned part per unit, stepping through the units in order (the feedback reads
        the full score r_{i−1} of the previous unit)."""
        h, c = state
        learned, previous = [], torch.zeros_like(h)
        for i in range(len(self.sizes)):
            z = torch.cat([self._embed(i), previous], dim=1)
            if self.recurrent:
                h, c = self.cell(z, (h, c))
                out = h
            else:
                out = self.mlps[i](torch.cat([z[:, : h.shape[1]], state[0]], dim=1))
            part = self._head(i, out)
            learned.append(part)
            if self.feedback and i + 1 < len(self.sizes):
                previous = self._feedback(i, self.prior_weight * getattr(self, f"stats_bias_{i}") + part)
        return learned

    def forward(self, state: Tuple[torch.Tensor, torch.Tensor]) -> List[torch.Tensor]:
        return [self.prior_weight * b + part for b, part in zip(self.prior(), self.learned(state))]


class PASSSearch(nn.Module):
    """Everything the search learns: the prompt V, the encoder ω and the hypernetwork θ.

    The hypernetwork steps through the units in `order` (forward execution); `scores` and
    `learned` hand them back in the channel space's group order."""

    def __init__(self, prompt: PadPrompt, encoder: PromptEncoder, hypernet: RecurrentHyperNetwork,
                 use_prompt: bool = True, order: Optional[Sequence[int]] = None):
        super().__init__()
        self.prompt, self.encoder, self.hypernet, self.use_prompt = prompt, encoder, hypernet, use_prompt
        self.order = list(order) if order is not None else list(range(len(hypernet.sizes)))

    def _state(self):
        v = self.prompt.visible()[None]
        if not self.use_prompt:
            v = torch.zeros_like(v)
        return self.encoder(v)

    def _space_order(self, per_step: List[torch.Tensor]) -> List[torch.Tensor]:
        out: List[Optional[torch.Tensor]] = [None] * len(per_step)
        for step, group in enumerate(self.order):
            out[group] = per_step[step]
        return out

    def scores(self) -> List[torch.Tensor]:
        return self._space_order(self.hypernet(self._state()))

    def learned(self) -> List[torch.Tensor]:
        """The learned part of each score (z-units), in group order."""
        return self._space_order(self.hypernet.learned(self._state()))

    def prior(self) -> List[torch.Tensor]:
        """The statistics prior b_i, in group order."""
        return self._space_order(self.hypernet.prior())

    def prompted(self, x: torch.Tensor) -> torch.Tensor:
        return self.prompt(x) if self.use_prompt else x


# --- statistics, thresholds -----------------------------------------------------------------
def _zscore(s: torch.Tensor) -> torch.Tensor:
    return (s - s.mean()) / s.std(unbiased=False).clamp_min(1e-8)


def _bn_gamma(model: nn.Module, space: ChannelSpace) -> List[torch.Tensor]:
    out = []
    for g in space.groups:
        gammas = [model.get_submodule(n).weight.detach().abs().float().cpu() for n in g.out_members
                  if isinstance(model.get_submodule(n), nn.BatchNorm2d) and model.get_submodule(n).affine]
        out.append(torch.stack(gammas).mean(0) if gammas else torch.ones(g.size))
    return out


def weight_statistics(model: nn.Module, space: ChannelSpace, kind: str) -> List[torch.Tensor]:
    """s_i per group: (C_i, n_stats), each statistic z-scored within the group; column 0 is b_i's init.
    `quantile` takes all three (the hypernetwork pools them to quantiles)."""
    table = {"l2": lambda: MagnitudeImportance(p=2)(model, space),
             "l1": lambda: MagnitudeImportance(p=1)(model, space),
             "bn": lambda: _bn_gamma(model, space)}
    kinds = ["l2", "l1", "bn"] if kind in ("all", "quantile") else [kind]
    columns = [table[k]() for k in kinds]
    return [torch.stack([_zscore(col[g]) for col in columns], dim=1) for g in range(len(space.groups))]


def soft_threshold(scores: List[torch.Tensor], kept: List[torch.Tensor], scope: str) -> List[torch.Tensor]:
    """τ per group: midway between the lowest kept and the highest pruned score (one τ for
    `global`, the group's own for `uniform`); only the straight-through gradient reads it."""
    def midpoint(pairs):
        kept_s = torch.cat([s[k] for s, k in pairs])
        pruned_s = torch.cat([s[~k] for s, k in pairs])
        if not len(pruned_s):
            return kept_s.min() - 1.0
        return (kept_s.min() + pruned_s.max()) / 2 if len(kept_s) else pruned_s.max() + 1.0

    if scope == "global":
        tau = midpoint(list(zip(scores, kept)))
        return [tau] * len(scores)
    return [midpoint([(s, k)]) for s, k in zip(scores, kept)]


# --- adaptive BN, masked accuracy ---------------------------------------------------------------
def recalibrate_bn(model: nn.Module, batches, transform=lambda x: x) -> int:
    """Adaptive BN: re-estimate every BN layer's running statistics under the masks now on the
    model, from forward passes only (no gradient, weights untouched), as a cumulative average
    over `batches` (momentum None); the model is left in eval mode. Returns the images used."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    images = 0
    with torch.no_grad():
        for x in batches:
            model(transform(x))
            images += len(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return images


def units_changed(kept: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> int:
    """Channels kept by one selection and pruned by the other."""
    return int(sum(int((a != b).sum()) for a, b in zip(kept, reference)))


# --- the search, as trainer hooks ------------------------------------------------------------
class MaskedPromptSearch(TrainerHook):
    """Each step: prompt the batch, score channels, set straight-through masks on the gates.

    Every `bn_every` steps (from step 0) it first recalibrates BN under the current hard masks
    (`bn_batches` train batches, counted as search MACs) and measures the masked network's
    validation accuracy; `bn_every=0` keeps BN frozen at the dense statistics."""

    def __init__(self, search: PASSSearch, space: ChannelSpace, gates, flops_ratio: float, scope: str,
                 min_channels: int, temperature: float, lambda_flops: float, bn_every: int = 0,
                 bn_batches: int = 0, val_loader=None, prior_final: float = 1.0, total_steps: int = 0,
                 shuffle_labels: Optional[torch.Generator] = None, budget_ramp: float = 0.0):
        self.search, self.space, self.gates = search, space, gates
        # the FLOPs ratio the masks meet falls linearly from 1 to the target over this fraction of the search
        self.budget_ramp, self.target_ratio = budget_ramp, flops_ratio
        # the signal control: targets permuted within each batch by this generator (None: true labels)
        self.shuffle_labels = shuffle_labels
        self.flops_ratio, self.scope, self.min_channels = flops_ratio, scope, min_channels
        self.temperature, self.lambda_flops = temperature, lambda_flops
        self.bn_every, self.bn_batches, self.val_loader = bn_every, bn_batches, val_loader
        self.prior_final, self.total_steps = prior_final, total_steps
        self.soft: List[torch.Tensor] = []
        self.last_masks: List[torch.Tensor] = []
        self.recalibrated: Optional[List[torch.Tensor]] = None     # masks at the last recalibration
        self.losses: list = []        # per step: the loss on the device until loss_values() reads it
        self.masked_val: List[Tuple[int, float]] = []

    def masks(self) -> List[torch.Tensor]:
        scores = self.search.scores()
        detached = [r.detach().cpu() for r in scores]
        kept = self.space.select(detached, self.flops_ratio, scope=self.scope, min_units=self.min_channels)
        taus = soft_threshold(detached, kept, self.scope)
        self.soft = [torch.sigmoid((r - float(t)) / self.temperature) for r, t in zip(scores, taus)]
        self.last_masks = kept
        return [straight_through(k.to(s.device), s) for k, s in zip(kept, self.soft)]

    def anneal(self, step: int) -> None:
        """α: 1 at step 0 → `prior_final` at the last step (constant 1 by default); the budget the
        masks meet: 1 at step 0 → the target at `budget_ramp` of the search (the target throughout
        at `budget_ramp=0`)."""
        t = min(1.0, step / max(1, self.total_steps - 1))
        self.search.hypernet.prior_weight = 1.0 + (self.prior_final - 1.0) * t
        # the target reached at step budget_ramp·(T − 1): with budget_ramp=1, the last search step
        ramp = min(1.0, step / max(1.0, self.budget_ramp * (self.total_steps - 1))) if self.budget_ramp else 1.0
        self.flops_ratio = 1.0 - (1.0 - self.target_ratio) * ramp

    def adapt_bn(self, trainer) -> None:
        model, kept = trainer.model, self.last_masks
        self.gates.set([k.float().to(trainer.device) for k in kept])
        batches = (trainer.next_batch()[0] for _ in range(self.bn_batches))
        images = recalibrate_bn(model, batches, self.search.prompted)
        trainer.add_macs(forward=images * self.space.macs([int(k.sum()) for k in kept]))
        flipped = units_changed(kept, self.recalibrated) if self.recalibrated is not None else 0
        self.recalibrated = [k.clone() for k in kept]
        numbers = {"images": images, "flipped_since_last": flipped}
        recalibrations = math.ceil(max(1, self.total_steps) / self.bn_every)
        stride = max(1, math.ceil(recalibrations / VAL_POINTS))
        if self.val_loader is not None and (trainer.step // self.bn_every) % stride == 0:
            acc = evaluate(model, self.val_loader, trainer.device, trainer.num_classes,
                           transform=self.search.prompted, precision=trainer.recipe.precision).top1
            trainer.curve.add_value("masked_val_top1", trainer.position, acc)
            self.masked_val.append((trainer.position, acc))
            numbers["masked_val_top1"] = acc
        trainer.event("bn_recalibration", **numbers)

    def before_forward(self, trainer, inputs, targets):
        self.anneal(trainer.step)
        values = self.masks()
        if self.bn_every and trainer.step % self.bn_every == 0 and trainer.micro_batch == 0:   # once per step
            self.adapt_bn(trainer)
        self.gates.set(values)
        return self.search.prompted(inputs), self.labels(targets)

    def labels(self, targets: torch.Tensor) -> torch.Tensor:
        """The targets the search loss sees: as given, or (signal control) permuted within the batch."""
        if self.shuffle_labels is None:
            return targets
        order = torch.randperm(len(targets), generator=self.shuffle_labels)
        return targets[order.to(targets.device)]

    def extra_loss(self, trainer, inputs, outputs, targets):
        if not self.lambda_flops:
            return None
        soft_macs = self.space.macs([s.sum() for s in self.soft])
        return self.lambda_flops * torch.log(soft_macs / (self.flops_ratio * self.space.dense_macs)).abs()

    def after_step(self, trainer) -> None:
        self.losses.append(trainer.loss.detach())     # read later, in one go: no host sync per step

    def loss_values(self) -> List[float]:
        """The search's training losses, one per step, as numbers."""
        unread = [i for i, v in enumerate(self.losses) if isinstance(v, torch.Tensor)]
        if unread:
            for i, value in zip(unread, torch.stack([self.losses[i].float() for i in unread]).tolist()):
                self.losses[i] = value
        return self.losses

    def state_dict(self) -> dict:
        """The telemetry so far, so a resumed search reports all of its steps."""
        return {"losses": list(self.loss_values()), "masked_val": [list(p) for p in self.masked_val],
                "recalibrated": None if self.recalibrated is None else [k.clone() for k in self.recalibrated],
                **({} if self.shuffle_labels is None else {"label_generator": self.shuffle_labels.get_state()})}

    def load_state_dict(self, state: dict) -> None:
        self.losses = list(state["losses"])
        self.masked_val = [tuple(p) for p in state["masked_val"]]
        self.recalibrated = state["recalibrated"]
        if self.shuffle_labels is not None and "label_generator" in state:
            self.shuffle_labels.set_state(state["label_generator"])


# at or below this multiple of chance accuracy, the masked network's loss cannot rank channels
AT_CHANCE = 2.0


def at_chance_note(metrics: dict, num_classes: int, steps: int, budget_ramp: float = 0.0) -> str:
    """A remark for the verdict when the search ran on a network at chance: the prior's masks at the
    target, BN recalibrated, score at most `AT_CHANCE` × 1/classes on validation, so the frozen
    masked network's loss carries no information about which channels to keep and whatever the
    search moves, it moves on noise (measured: resnet20_tiny at FLOPs 0.25, docs/evidence.md)."""
    prior = metrics.get("masked_val_top1_prior")
    if not steps or prior is None or prior > AT_CHANCE / num_classes:
        return ""
    where = ("ended its search (budget_ramp) on a network at chance" if budget_ramp
             else "searched on a network at chance")
    return (f"{where}: the prior's masked val top-1 {prior:.3f} at the target is at most "
            f"{AT_CHANCE:g}x chance (1/{num_classes}), so the search loss could not rank channels there")


# --- the method ---------------------------------------------------------------------------------
@register_method("pass")
class PASS(Method):
    """PASS: visual prompt + recurrent hypernetwork channel search under a FLOPs budget (reconstruction)."""

    granularity = "channel"
    starts_from = "pretrained"

    null_control = {"search": False}
    signal_controls = {"shuffled labels": {"labels": "shuffled"}, **SANITY_CONTROLS}
    mechanism_thresholds = {"units_changed_fraction": 0.10, "score_change_mean": 0.20}
    # 2 search epochs (38 steps on digits) move the selection off the prior in both residual modes; at the
    # family recipe's 1 epoch, residual_mode=coupled at FLOPs 0.5 moved 7 % of the channels (needs 10 %)
    default_budget = {"search_epochs": 2}

    @dataclass(frozen=True)
    class Config:
        residual_mode: Literal["internal", "coupled"] = "internal"  # compare with l1-channel at the same mode
        scope: Literal["global", "uniform"] = "global"     # one ranking across layers, or a per-layer keep ratio
        search: bool = True                                # False: the null control, the prior's selection alone
        use_prompt: bool = True
        recurrent: bool = True                             # False: independent per-layer MLPs
        feedback: bool = True                              # previous unit's scores as LSTM input
        stats: Literal["l2", "l1", "bn", "all", "quantile"] = "l2"
        init_bias_from_stats: bool = True                  # b_i = s_i: start from the magnitude ranking
        prior_final: float = 1.0                           # prior weight α at the end of the search (1: no annealing)
        # fraction of the search over which the masks' FLOPs budget falls from 1 to ρ (0: ρ from step 0):
        # at an aggressive ρ the masked network sits at chance and its loss ranks nothing
        budget_ramp: float = dataclasses.field(default=0.0, metadata=OMITTED_AT_DEFAULT)
        pad_size: Optional[int] = None                     # None: min(16, H // 8)
        hidden: int = 64                                   # d
        encoder_channels: Tuple[int, ...] = (16, 32)
        ste_temperature: float = 0.5                       # T
        lambda_flops: float = 0.0
        lr: float = 3e-3                                   # θ and ω
        prompt_lr: float = 3e-3                            # V
        bn_every: int = 5                                  # adaptive BN every k search steps (0: BN frozen)
        bn_batches: int = 4                                # train batches per recalibration
        min_channels: int = 1
        keep_prompt: bool = False
        init_hypernet_from: Optional[str] = None           # transfer: a file saved by save_hypernet
        save_hypernet: Optional[str] = None
        # "shuffled": the signal control, the search's targets permuted within each batch
        labels: Literal["true", "shuffled"] = dataclasses.field(default="true", metadata=OMITTED_AT_DEFAULT)
        # sanity checks (training.sanity): "shuffle" the searched channels permuted within each group
        # (same widths), "reinit" the searched structure re-initialised and trained from scratch
        sanity: Literal["none", "shuffle", "reinit"] = sanity_field()

        def __post_init__(self):
            if self.hidden < 1 or self.min_channels < 1 or self.ste_temperature <= 0:
                raise ValueError("hidden and min_channels must be >= 1 and ste_temperature > 0")
            if self.lambda_flops < 0:
                raise ValueError(f"lambda_flops must be >= 0, got {self.lambda_flops}")
            if self.bn_every < 0 or self.bn_batches < 0 or (self.bn_every and not self.bn_batches):
                raise ValueError("bn_every and bn_batches must be >= 0, and bn_batches >= 1 when bn_every > 0")
            if self.lr <= 0 or self.prompt_lr <= 0:
                raise ValueError("lr and prompt_lr must be > 0")
            if not 0.0 <= self.budget_ramp <= 1.0:
                raise ValueError(f"budget_ramp must be in [0, 1], got {self.budget_ramp}")

    def supports(self, model: nn.Module, family: str) -> bool:
        return family == "cnn"

    # -- pieces ---------------------------------------------------------------------------
    def build(self, ctx: MethodContext, space: ChannelSpace) -> PASSSearch:
        cfg = self.config
        c, h, w = ctx.input_size
        mean, std = input_normalisation(ctx)
        pad = cfg.pad_size if cfg.pad_size is not None else min(16, max(1, min(h, w) // 8))
        order = space.forward_order()                      # the LSTM walks the network as it executes
        stats = weight_statistics(ctx.model, space, cfg.stats)
        bias = [s[:, 0] if cfg.init_bias_from_stats else torch.zeros(len(s)) for s in stats]
        torch.manual_seed(ctx.seed)
        search = PASSSearch(PadPrompt(ctx.input_size, pad, mean, std),
                            PromptEncoder(c, cfg.encoder_channels, cfg.hidden),
                            RecurrentHyperNetwork([stats[i] for i in order], [bias[i] for i in order], cfg.hidden,
                                                  cfg.recurrent, cfg.feedback, cfg.ste_temperature,
                                                  quantiles=QUANTILES if cfg.stats == "quantile" else 0),
                            use_prompt=cfg.use_prompt, order=order)
        return search.to(ctx.device)

    def signature(self, space: ChannelSpace, search: PASSSearch) -> dict:
        """What a saved hypernetwork must share with the model it is loaded onto."""
        cfg = self.config
        shape_free = cfg.stats == "quantile" and cfg.recurrent
        groups = None if shape_free else [space.groups[i].size for i in search.order]
        return {"groups": groups, "residual_mode": space.residual_mode, "stats": cfg.stats, "hidden": cfg.hidden,
                "recurrent": cfg.recurrent, "encoder_channels": list(cfg.encoder_channels), "prompt": list(search.prompt.prompt.shape),
                "pad_size": search.prompt.pad}

    def save(self, path: str, space: ChannelSpace, search: PASSSearch, ctx: MethodContext) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": HYPERNET_FORMAT, "signature": self.signature(space, search),
                    "found_on": {"model": ctx.model_name, "dataset": getattr(ctx.data_info, "name", None)},
                    "state": {k: v.detach().cpu() for k, v in search.state_dict().items()}}, path)

    def load(self, path: str, space: ChannelSpace, search: PASSSearch) -> dict:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise SpecError(f"init_hypernet_from={path!r}: no such file") from None
        if not isinstance(saved, dict) or saved.get("format") != HYPERNET_FORMAT:
            raise SpecError(f"init_hypernet_from={path!r} is not a PASS hypernetwork file ({HYPERNET_FORMAT})")
        here = self.signature(space, search)
        for key, value in here.items():
            if saved["signature"].get(key) != value:
                raise SpecError(f"init_hypernet_from={path!r}: architecture mismatch in {key} "
                                f"(saved {saved['signature'].get(key)}, here {value}); a hypernetwork transfers "
                                "only between models of the same architecture and PASS settings")
        search.load_state_dict(saved["state"])
        return saved.get("found_on", {})

    # -- the run ----------------------------------------------------------------------------
    def run(self, ctx: MethodContext) -> Outcome:
        cfg = self.config
        if isinstance(ctx.model, VisionTransformer):
            raise SpecError(f"pass supports CNNs only (ResNet, VGG, MobileNetV2), not {ctx.model_name!r}")
        model, rho = ctx.model.to(ctx.device).eval(), ctx.target.value
        trainable = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)                        # the backbone is not a search variable
        dense_buffers = {n: b.clone() for n, b in model.named_buffers()}
        space = ChannelSpace(model, ctx.input_size, cfg.residual_mode)
        search = self.build(ctx, space)
        notes = {"faithfulness": "reconstruction", "residual_mode": cfg.residual_mode, "scope": cfg.scope,
                 "units": space.describe(), "groups": len(space.groups), "pad_size": search.prompt.pad,
                 "search_params": sum(p.numel() for p in search.parameters()),
                 "lstm_order": [space.groups[i].root for i in search.order]}
        if cfg.init_hypernet_from:
            notes["init_hypernet_from"] = {"path": cfg.init_hypernet_from,
                                           **self.load(cfg.init_hypernet_from, space, search)}
        # the search-free selection: the same selection code on the statistics alone
        prior = [s[:, 0] for s in weight_statistics(model, space, cfg.stats)]
        prior_kept = space.select(prior, rho, scope=cfg.scope, min_units=cfg.min_channels)
        with torch.no_grad():
            learned_start = [r.detach().cpu() for r in search.learned()]

        gates = space.gate(model)
        steps = ctx.budget.left if cfg.search else 0
        hook = MaskedPromptSearch(search, space, gates, rho, cfg.scope, cfg.min_channels, cfg.ste_temperature,
                                  cfg.lambda_flops, cfg.bn_every, cfg.bn_batches, ctx.val_loader,
                                  cfg.prior_final, steps,
                                  shuffle_labels=(torch.Generator().manual_seed(ctx.seed)
                                                  if cfg.labels == "shuffled" else None), budget_ramp=cfg.budget_ramp)
        hyper = [p for n, p in search.named_parameters() if not n.startswith("prompt.")]
        groups = [{"params": hyper, "lr": cfg.lr, "weight_decay": 0.0}]
        if cfg.use_prompt:
            groups.append({"params": [search.prompt.prompt], "lr": cfg.prompt_lr, "weight_decay": 0.0})
        recipe = dataclasses.replace(ctx.recipe, optimizer="adamw")
        trainer = ctx.make_trainer(model, hooks=[hook], param_groups=groups, train_model_params=False,
                                   model_mode="eval", recipe=recipe, lr=cfg.lr)
        start = time.perf_counter()
        try:
            gates.set([k.float().to(ctx.device) for k in prior_kept])
            frozen_bn_val = evaluate(model, ctx.val_loader, ctx.device, ctx.num_classes,
                                     precision=ctx.recipe.precision).top1   # prior's masks, dense BN
            gates.clear()
            if steps > 0:
                trainer.fit(steps, progress=ctx.progress, desc="pass search")
            search.eval()
            with torch.no_grad():                          # extraction: one deterministic forward
                hook.anneal(steps)
                scores = [r.cpu() for r in search.scores()]
                learned_end = [r.detach().cpu() for r in search.learned()]
            kept = space.select(scores, rho, scope=cfg.scope, min_units=cfg.min_channels)
            if cfg.sanity == "shuffle":                    # the widths the search found, random channels
                kept = shuffle_within_layers(kept, torch.Generator().manual_seed(ctx.seed))
                notes["sanity"] = {"check": "shuffle", "why": "searched channels permuted within each group"}
            # telemetry: each selection with BN recalibrated under its own masks, unprompted (as deployed)
            final_val, batches = {}, [trainer.next_batch()[0] for _ in range(FINAL_BN_BATCHES)]
            for name, masks in (("searched", kept), ("prior", prior_kept)):
                gates.set([k.float().to(ctx.device) for k in masks])
                recalibrate_bn(model, batches)           # the same batches for both: only the masks differ
                final_val[name] = evaluate(model, ctx.val_loader, ctx.device, ctx.num_classes,
                                           precision=ctx.recipe.precision).top1
                gates.clear()
        finally:
            gates.remove()
            with torch.no_grad():                          # the extracted model keeps the dense BN statistics
                for n, b in model.named_buffers():
                    b.copy_(dense_buffers[n])
            for p, flag in trainable.items():
                p.requires_grad_(flag)
        notes.update(search_steps=trainer.step, search_seconds=round(time.perf_counter() - start, 3))
        notes["bn_recalibrations"] = ctx.curve.event_count("bn_recalibration")

        compact = space.compact(model, kept)
        x = next(iter(ctx.val_loader))[0].to(ctx.device)
        notes["compaction_max_abs_error"] = space.check_compaction(model, kept, compact, x)
        notes["closed_form_flops_ratio"] = space.macs([int(k.sum()) for k in kept]) / space.dense_macs
        if cfg.save_hypernet:
            self.save(cfg.save_hypernet, space, search, ctx)
            notes["hypernet_saved_to"] = cfg.save_hypernet
        notes["keep_prompt"] = bool(cfg.keep_prompt and cfg.use_prompt)
        if notes["keep_prompt"]:
            compact = attach_prompt(compact, search.prompt)
            c, h, w = ctx.input_size
            notes["prompt_input_op"] = {
                "additions_per_image": c * h * w,           # plus de-/re-normalisation and a clamp, all element-wise
                "params": search.prompt.prompt.numel(),
                "counted_in_macs": False,
                "why": "element-wise ops are excluded from headline MACs by convention (measure/flops.py)"}
        metrics = self.telemetry(space, kept, prior_kept, learned_start, learned_end, search, hook,
                                 frozen_bn_val, final_val)
        return Outcome(model=compact, realization="compacted", structure=space.structure(kept),
                       prunable=list(prunable_weights(model)), notes=notes,
                       mechanism=judge_mechanism(self, metrics, at_chance_note(metrics, ctx.num_classes, steps, cfg.budget_ramp)))

    @staticmethod
    def telemetry(space, kept, prior_kept, learned_start, learned_end, search, hook, frozen_bn_val,
                  final_val) -> dict:
        """What the record's `mechanism` judges: did the search move the selection off the prior?"""
        total = sum(g.size for g in space.groups)
        changed = units_changed(kept, prior_kept)
        delta = torch.cat([(b - a).abs() for a, b in zip(learned_start, learned_end)])
        visible = search.prompt.visible().detach()
        losses = hook.loss_values()
        tenth = max(1, len(losses) // 10)
        r = lambda v, n=4: None if v is None else round(float(v), n)
        return {
            "units_changed": changed, "units_total": total, "units_changed_fraction": r(changed / total),
            "score_change_mean": r(delta.mean()), "score_change_max": r(delta.max()),
            "prompt_norm": r(visible.norm()), "prompt_max_abs": r(visible.abs().max()),
            "search_steps": len(losses),
            "search_loss_first": r(sum(losses[:tenth]) / tenth) if losses else None,
            "search_loss_last": r(sum(losses[-tenth:]) / tenth) if losses else None,
            "masked_val_top1_frozen_bn": r(frozen_bn_val),           # the prior's masks, dense BN statistics
            "masked_val_top1_during": [[step, r(acc)] for step, acc in hook.masked_val],
            "masked_val_top1_searched": r(final_val["searched"]),    # adaptive BN, no prompt
            "masked_val_top1_prior": r(final_val["prior"]),
            "bn_recalibrations": len(hook.masked_val) if hook.val_loader is not None else 0,
        }
