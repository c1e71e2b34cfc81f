"""The one training loop every method and the harness use.

Methods never write their own loop: they hand the `Trainer` hooks. One optimizer step runs

    before_forward  → forward → task loss → compute_loss → extra_loss → backward
                    → after_backward → optimizer step → after_step

and `on_phase` marks phase boundaries. At each point the hooks run in ascending
`TrainerHook.order`, ties in the order they were given. The order matters and is pinned by
a test: a hook that reads the dense gradient (RigL's grow criterion) has
`order = HookOrder.READS_DENSE_GRADIENTS` and runs before `MaskSet` (`HookOrder.MASKS`),
which zeroes masked gradients in `after_backward` and re-applies masks to weights and
optimizer state last in `after_step`, whatever other hooks did.

What a hook may do at each point:
- `before_forward(inputs, targets)`: return a replacement batch (OFB's masked patches for
  PMIM, a visual prompt on the inputs); later hooks see the replaced batch;
- `compute_loss(inputs, outputs, targets, loss)`: return a loss that replaces or wraps the
  task loss (distillation from the dense teacher, reconstruction);
- `extra_loss(...)`: add a term (PASS's FLOPs regulariser, OFB's one-hot loss);
- `after_backward`: read or change gradients (gradient masking, RigL's dense-gradient read);
- `after_step`: re-apply masks, update topology;
- `on_phase(name)`: learn of phases (GaP's grow/prune-back boundaries).
Extra trainable modules (prompts, hypernetworks, selectors, decoders) join through
`param_groups`. Every optimizer step is counted against the method's budget, and a
non-finite loss stops training with `Diverged` rather than training on NaNs.

Micro-batches (gradient accumulation): with `recipe.device_batch` set, a batch larger than it runs
as micro-batches. `before_forward`, the forward, `compute_loss`, `extra_loss` and backward run once
per micro-batch (`trainer.micro_batch` counts them from 0; each micro-batch's loss is weighted by
its share of the batch, so the gradients add up to the whole batch's); `after_backward`, the
optimizer step and `after_step` run once, with the gradients of the whole batch. Optimizer steps,
the LR schedule and the budget count batches, not micro-batches.

Feeding the device (as timm's train.py does): batches arrive on the device from a `DeviceLoader`
(`training/loading.py`); on CUDA a CNN trains in channels_last; `recipe.compile` trains through
`torch.compile`; evaluation runs under the training precision. The loss is read from the device
(for the divergence check and the curve) only every `finite_check_every` steps on CUDA, in
`_check_finite`, so steps queue without a host sync; on CPU, where reading costs nothing, every
step, as before. A step that fails after an unread non-finite loss is reported as that divergence.

Resume (`training/resume.py`): given a `RunCheckpoints`, every `fit` saves the trainer's
`state_dict()` (model, extra parameters, optimizer, step and schedule, budget, compute meter,
data position, every hook's `state_dict()`) with the process RNG states, and a rerun of the
same run loads it. A hook that keeps state across steps (a schedule's history, a generator,
a topology) overrides `state_dict` / `load_state_dict`; `MaskSet` saves its masks.

Training cost: every step adds its forward MACs (batch × per-sample MACs, a weight that a
hook keeps masked costing its density × its dense MACs, see `TrainerHook.masked_densities`)
and backward MACs to `trainer.compute` (`COST_CONVENTION`). A hook whose work the model's
forward does not show (a teacher's forward, a decoder) adds it with `trainer.add_macs`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from sparsebench.errors import Diverged
from sparsebench.platform import any_rank, current as current_platform, timing_section
from sparsebench.specs import Recipe
from sparsebench.training.rank_data import sharded
from sparsebench.training.resume import LoaderPosition, ResumeMismatch, RunCheckpoints, rng_state, set_rng_state
from sparsebench.training.telemetry import TrainingCurve
from sparsebench.training.watch import current_watch

COST_CONVENTION = (
    "MACs of training steps (validation passes excluded): forward = batch x per-image MACs of the model "
    "(torch FlopCounterMode), a conv/linear weight kept masked by a MaskSet costing its mask density x its "
    "dense MACs; backward = 2 x forward (activation and weight gradients) when any model parameter requires "
    "grad, including a frozen search with train_model_params=False, whose weight gradients autograd still "
    "computes; 1 x forward when no model parameter requires grad (activation gradients only); hooks add "
    "extra work (teacher forwards, decoders) through Trainer.add_macs"
)


# Optimizer steps between reads of the training loss on an asynchronous device (CUDA): each read waits
# for the device, and a divergence is still stopped within this many steps of its first non-finite loss.
FINITE_CHECK_EVERY = 50


def is_convnet(model: nn.Module) -> bool:
    """A model with a sliding-window convolution (a CNN), whose convolutions run faster in channels_last.
    A ViT's only convolution patchifies (kernel = stride) and gains nothing from it."""
    return any(isinstance(m, nn.Conv2d) and m.kernel_size != m.stride for m in model.modules())


def cudnn_benchmark(device: torch.device) -> bool:
    """Whether a run on `device` lets cuDNN pick its fastest kernels by timing (fixed shapes: always on CUDA)."""
    return torch.device(device).type == "cuda"


def training_loop(recipe: Recipe, device: torch.device, model: Optional[nn.Module]) -> dict:
    """How a run's trainers feed and step the device, as its record states it."""
    device = torch.device(device)
    return {"cudnn_benchmark": cudnn_benchmark(device),
            "channels_last": None if model is None else device.type == "cuda" and is_convnet(model),
            "compile": recipe.compile, "micro_batches": recipe.micro_batches(recipe.batch_size),
            "device_batch": recipe.device_batch, "loss_read_every": 1 if device.type == "cpu" else FINITE_CHECK_EVERY,
            "input": "uint8 batches normalised on the device"}


class BudgetExceeded(RuntimeError):
    pass


class HookOrder:
    """Where a hook runs among the others at each point of a step (ascending)."""

    READS_DENSE_GRADIENTS = -100   # must see gradients before masking zeroes them (RigL)
    DEFAULT = 0
    MASKS = 100                    # gradient masking; masks re-applied after everyone else


class TrainerHook:
    """Override what you need; every method has a no-op default. See the module docstring
    for the order of calls within a step."""

    order: int = HookOrder.DEFAULT
    version: int = 0          # bump whenever `masked_densities()` changes (the trainer caches costs by it)

    def state_dict(self) -> dict:
        """State that must survive a kill and resume (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def masked_densities(self) -> Dict[int, float]:
        """`{id(weight parameter): density}` of weights this hook keeps masked; each costs its
        density x its dense MACs in the trainer's compute count."""
        return {}

    def on_phase(self, trainer: "Trainer", phase: str) -> None: ...

    def before_forward(self, trainer: "Trainer", inputs: torch.Tensor, targets: torch.Tensor):
        """Return `(inputs, targets)` to replace the batch, or None to keep it."""
        return None

    def compute_loss(self, trainer: "Trainer", inputs, outputs, targets, loss: torch.Tensor) -> torch.Tensor:
        """Return the loss to use; the default keeps the task loss as it is."""
        return loss

    def extra_loss(self, trainer: "Trainer", inputs, outputs, targets) -> Optional[torch.Tensor]:
        return None

    def after_backward(self, trainer: "Trainer") -> None: ...

    def after_step(self, trainer: "Trainer") -> None: ...


class StepBudget:
    """Optimizer steps a method may spend, shared by all trainers it builds."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def spend(self, n: int = 1) -> None:
        if self.used + n > self.limit:
            raise BudgetExceeded(f"method exceeded its budget of {self.limit} optimizer steps")
        self.used += n

    @property
    def left(self) -> int:
        return self.limit - self.used

    def state_dict(self) -> dict:
        return {"limit": self.limit, "used": self.used}

    def load_state_dict(self, state: dict) -> None:
        self.limit, self.used = state["limit"], state["used"]


class ComputeMeter:
    """Forward and backward MACs of training, shared by the trainers of one phase (see COST_CONVENTION)."""

    def __init__(self):
        self.forward, self.backward = 0, 0
        self.complete = True      # False when a model's MACs could not be counted

    def add(self, forward: int = 0, backward: int = 0) -> None:
        self.forward += int(forward)
        self.backward += int(backward)

    def as_dict(self) -> dict:
        return {"forward": self.forward, "backward": self.backward, "total": self.forward + self.backward,
                "complete": self.complete}

    def state_dict(self) -> dict:
        return {"forward": self.forward, "backward": self.backward, "complete": self.complete}

    def load_state_dict(self, state: dict) -> None:
        self.forward, self.backward = int(state["forward"]), int(state["backward"])
        self.complete = bool(state["complete"])


@dataclass
class Accuracy:
    top1: float
    top5: Optional[float]
    loss: float
    n: int
    correct: Optional[torch.Tensor] = None   # per sample, in loader order (evaluate(per_sample=True))
    labels: Optional[torch.Tensor] = None


def autocast(precision: str, device: torch.device):
    """bf16 autocast for `precision="bf16"` (a no-op context for fp32)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
             per_sample: bool = False, transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             precision: str = "fp32") -> Accuracy:
    """Accuracy as sum of correct over sum of samples (never a mean of batch means).
    `per_sample` also keeps each sample's top-1 correctness and label, in loader order, so
    that two models evaluated on the same (unshuffled) loader can be compared sample by sample.
    `transform` is applied to each input batch first (e.g. a visual prompt). `precision` is the
    training recipe's: a bf16-trained model is evaluated under the same autocast. On a DDP run's
    sharded split (`RankShard`) each rank evaluates its share and every rank gets the totals."""
    was_training = model.training
    model.eval()
    # counted on the device and read once at the end: no host sync per batch (the float64 loss sum
    # adds the per-batch float32 sums exactly as Python floats did)
    device = torch.device(device)
    correct1 = torch.zeros((), dtype=torch.long, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    loss_sum, n = torch.zeros((), dtype=torch.float64, device=device), 0
    hits, labels = [], []
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with timing_section().work(), autocast(precision, device):   # as a training step: not while another worker times latency
            logits = model(x if transform is None else transform(x)).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        top = logits.topk(min(5, num_classes), dim=1).indices
        correct1 += (top[:, 0] == y).sum()
        correct5 += (top == y[:, None]).any(dim=1).sum()
        n += len(y)
        if per_sample:
            hits.append(top[:, 0] == y)
            labels.append(y)
    model.train(was_training)
    hits = torch.cat(hits).cpu() if hits else torch.zeros(0, dtype=torch.bool)
    labels = torch.cat(labels).cpu() if labels else torch.zeros(0, dtype=torch.long)
    correct1, correct5, loss_sum = int(correct1), int(correct5), float(loss_sum)    # the one read
    shard = sharded(loader)
    if shard is not None:            # this rank's share of a DDP run's split: every sample counted once
        correct1, correct5, loss_sum, n = shard.totals(correct1, correct5, loss_sum, n)
        n = int(n)
        if per_sample:
            hits, labels = shard.in_order(hits), shard.in_order(labels)
    return Accuracy(correct1 / n, correct5 / n if num_classes > 10 else None, loss_sum / n, n,
                    hits if per_sample else None, labels if per_sample else None)


def non_finite_tensors(model: nn.Module) -> List[str]:
    """Names of the floating-point parameters and buffers holding a NaN or an inf."""
    return [n for n, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _ordered(hooks: Iterable[TrainerHook]) -> List[TrainerHook]:
    return sorted(hooks, key=lambda h: getattr(h, "order", HookOrder.DEFAULT))   # stable: ties keep their order


@dataclass
class TrainResult:
    steps: int
    wall_seconds: float
    best_val_top1: Optional[float] = None
    best_step: Optional[int] = None
    history: List[dict] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        train_loader: DataLoader,
        recipe: Recipe,
        device: torch.device,
        num_classes: int,
        lr: float,
        hooks: Sequence[TrainerHook] = (),
        param_groups: Iterable[dict] = (),
        budget: Optional[StepBudget] = None,
        train_model_params: bool = True,
        model_mode: str = "train",
        no_weight_decay: Iterable[torch.nn.Parameter] = (),
        checkpoints: Optional[RunCheckpoints] = None,
        compute: Optional[ComputeMeter] = None,
        stage: str = "training",
        curve: Optional[TrainingCurve] = None,
    ):
        """`train_model_params=False` freezes the model (only `param_groups` learn);
        `model_mode="eval"` keeps BN statistics and dropout frozen during training steps
        (a search over a fixed backbone); `no_weight_decay` lists model parameters that must
        not decay (e.g. a token selector). `checkpoints` makes every `fit` save and resume
        (module docstring); `compute` is the MACs meter to add to (shared by a phase's trainers); `curve` the
        stage's `TrainingCurve` (shared likewise; the step axis is the budget's steps when
        the trainer has a budget, its own otherwise)."""
        if model_mode not in ("train", "eval"):
            raise ValueError(f"model_mode must be 'train' or 'eval', got {model_mode!r}")
        self.model, self.train_loader, self.recipe = model, train_loader, recipe
        self.device, self.num_classes, self.lr = device, num_classes, lr
        self.hooks: List[TrainerHook] = _ordered(hooks)
        self.budget = budget
        self.model_mode = model_mode
        self.stage = stage                # named in `Diverged` (method, finetune, dense)
        self.step = 0                     # optimizer steps taken by this trainer
        self.schedule_start, self.schedule_steps = 0, None   # LR schedule horizon
        self.loss: Optional[torch.Tensor] = None
        self.batch = None
        self.micro_batch = 0              # which micro-batch of the step the hooks see (recipe.device_batch)
        self.finite_check_every = 1 if device.type == "cpu" else FINITE_CHECK_EVERY
        self.last_loss: Optional[float] = None   # the latest training loss read from the device
        self._unread: List[tuple] = []    # (step, curve position, loss on the device, lr) not yet read
        self._groups = []
        if train_model_params:
            exempt = {id(p) for p in no_weight_decay}
            params = [p for p in model.parameters() if p.requires_grad]
            decay = [p for p in params if p.ndim > 1 and id(p) not in exempt]
            no_decay = [p for p in params if p.ndim <= 1 or id(p) in exempt]
            self._groups += [{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}]
        self._groups += [dict(g) for g in param_groups]
        self._groups = [g for g in self._groups if g["params"]]
        self.reset_optimizer()
        self._data = LoaderPosition(train_loader)
        self.checkpoints = checkpoints
        self.compute = compute if compute is not None else ComputeMeter()
        self.curve = curve if curve is not None else TrainingCurve()
        self._layer_macs = None          # (input shape, dense per-image MACs, {id(weight): dense MACs})
        self._forward_macs = None        # (mask versions, per-image MACs with masks)
        self._platform = current_platform()
        self.channels_last = device.type == "cuda" and is_convnet(model)
        self._set_memory_format(training=True)
        self._ddp = self._distributed_model(train_model_params)
        self._mask_versions: Dict[int, int] = {}
        # torch.compile traces on the first step; masks and hooks change weights in place, which it sees
        self._compiled = torch.compile(self._ddp or self.model) if recipe.compile else None
        # the run's live logging and resource use (training/watch.py), when a run is watched
        self._watch = current_watch()
        if self._watch is not None:
            self._watch.attach(self)

    # --- torchrun / DDP ----------------------------------------------------------------------
    def _distributed_model(self, train_model_params: bool):
        """Under torch.distributed: the model in DistributedDataParallel (its constructor copies rank 0's
        weights and buffers to every rank; backward averages the gradients). BN statistics stay per rank."""
        if not self._platform.distributed or not train_model_params \
                or not any(p.requires_grad for p in self.model.parameters()):
            return None
        from torch.nn.parallel import DistributedDataParallel

        import inspect

        ids = [self.device.index] if self.device.type == "cuda" and self.device.index is not None else None
        no_buffer_sync = {"forward_sync_buffers": False} \
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
            else {"broadcast_buffers": False}
        return DistributedDataParallel(self.model, device_ids=ids, **no_buffer_sync)

    def _average_extra_gradients(self) -> None:
        """Trainable modules outside the model (prompts, hypernetworks) are not in DDP: average them here."""
        import torch.distributed as dist

        for p in self._extra_params():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self._platform.world_size)

    def _sync_masks(self) -> None:
        """Masks identical on every rank: after each mask update, rank 0's masks are broadcast and applied.
        (They agree anyway when every rank draws the same random numbers; this makes it certain.)"""
        import torch.distributed as dist

        for h in self.hooks:
            masks = getattr(h, "masks", None)
            if not isinstance(masks, dict) or self._mask_versions.get(id(h)) == getattr(h, "version", None):
                continue
            for name in sorted(masks):
                flat = masks[name].to(torch.uint8)
                dist.broadcast(flat, src=0)
                masks[name].copy_(flat.bool())
            if hasattr(h, "apply"):
                h.apply()
            self._mask_versions[id(h)] = getattr(h, "version", None)

    def reset_optimizer(self) -> None:
        """A fresh optimizer (no momentum or Adam moments) over the same parameter groups."""
        groups = [dict(g) for g in self._groups]
        if self.recipe.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.recipe.momentum, nesterov=True)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=self.lr)
        for g in self.optimizer.param_groups:
            g["base_lr"] = g.get("lr", self.lr)

    def restart_schedule(self, steps: int, elapsed: int = 0) -> None:
        """Start a new warm-up + cosine LR schedule of `steps` steps from the current step,
        `elapsed` of them already taken (a fresh trainer joining a schedule midway, as
        P-GaP's replicas do)."""
        self.schedule_start, self.schedule_steps = self.step - elapsed, steps

    @property
    def position(self) -> int:
        """The step on the stage's curve: budget steps spent (shared by a method's trainers), or this trainer's."""
        return self.budget.used if self.budget is not None else self.step

    def event(self, kind: str, **numbers) -> None:
        """Mark a mask or structure update (or any discrete act of a method) on the curve."""
        self.curve.add_event(self.position, kind, **numbers)

    def add_hook(self, hook: TrainerHook) -> None:
        self.hooks = _ordered([*self.hooks, hook])

    def phase(self, name: str) -> None:
        for h in self.hooks:
            h.on_phase(self, name)

    def _set_lr(self) -> None:
        step, total = self.step - self.schedule_start, self.schedule_steps
        warmup = int(self.recipe.warmup_fraction * total)
        if step < warmup:
            scale = (step + 1) / warmup
        else:
            progress = (step - warmup) / max(1, total - warmup)
            scale = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * scale

    def autocast(self):
        """bf16 autocast for `precision="bf16"`: parameters, gradients, masks and optimizer state stay fp32."""
        return autocast(self.recipe.precision, self.device)

    def _set_memory_format(self, training: bool) -> None:
        """channels_last while a CNN trains on CUDA; the default layout otherwise (measurement, saving)."""
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last if training else torch.contiguous_format)
            self._training_format = training

    def next_batch(self):
        """The next training batch on the device (normalised float images; see `training/loading.py`)."""
        if self._data is None:
            self._data = LoaderPosition(self.train_loader)
        x, y = next(self._data)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def train_step(self) -> torch.Tensor:
        """One optimizer step: forward, loss (+ hooks' terms), backward, hooks, step, hooks.
        A step is work in the timing section: it waits while another worker times latency."""
        with timing_section().work():
            try:
                return self._train_step()
            except Diverged:
                raise
            except Exception:
                # after an unread non-finite loss a step can fail on the NaNs it left (a top-k of NaN
                # scores, a multinomial of NaN probabilities): that is the divergence, reported as such
                self._check_finite()
                raise

    def _check_finite(self) -> None:
        """Read the losses of the steps since the last read from the device (one sync) onto the curve.
        A non-finite one ends training with `Diverged`, naming the step that produced it and, when it
        was read later, the step at which it was read. On CPU every step is read at once."""
        if not self._unread:
            return
        unread, self._unread = self._unread, []
        values = torch.stack([loss.float() for _, _, loss, _ in unread]).tolist()
        bad = next((i for i, value in enumerate(values) if not math.isfinite(value)), None)
        for (step, position, _, lr), value in zip(unread[:bad], values[:bad]):
            self.curve.add_step(position, value, lr)
            self.last_loss = value
        # every rank of a DDP run reads at the same steps, and stops here together (`any_rank`)
        if any_rank(bad is not None):
            read = unread[-1][0]
            if bad is None:
                raise Diverged(self.stage, f"non-finite training loss on another rank, read at step {read}")
            step = unread[bad][0]
            late = "" if step == read else f", read at step {read}"
            raise Diverged(self.stage, f"non-finite training loss ({values[bad]:.3g}) at step {step}{late}")

    def finish(self) -> None:
        """Read the losses not yet read (`Diverged` if one is not finite) and give the model back in the
        default memory format. `fit` does this as it ends; code that calls `train_step` itself calls it."""
        self._check_finite()
        self._set_memory_format(training=False)

    def _train_step(self) -> torch.Tensor:
        if self.schedule_steps is None:
            raise RuntimeError("no LR schedule: call fit(steps) or restart_schedule(steps) first")
        if self.budget is not None:
            self.budget.spend(1)
        self.model.train(self.model_mode == "train")
        if self.channels_last and not self._training_format:
            self._set_memory_format(training=True)
        started = time.perf_counter()
        x, y = self.next_batch()
        fetched = time.perf_counter()
        # counted before the training forward, so its extra forward (first step only) cannot
        # overwrite activations a hook captures for after_backward
        per_image = self.forward_macs_per_image(x.shape[1:])
        loss, self.batch = self._forward_backward(x, y)
        self._unread.append((self.step + 1, self.position, loss.detach(), self.optimizer.param_groups[0]["lr"]))
        if len(self._unread) >= self.finite_check_every:
            self._check_finite()         # before the optimizer step: a non-finite loss never reaches the weights
        self.loss = loss
        if self._platform.distributed:
            self._average_extra_gradients()
        self._count_step(x.shape[0] * self._platform.world_size * per_image)   # every rank's share of the batch
        for h in self.hooks:
            h.after_backward(self)
        self.optimizer.step()
        self.step += 1
        for h in self.hooks:
            h.after_step(self)
        if self._platform.distributed:
            self._sync_masks()
        if self._watch is not None:
            self._watch.after_step(self, x.shape[0] * self._platform.world_size, fetched - started,
                                   time.perf_counter() - started)
        return loss.detach()

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """Forward, loss and backward of one batch, as micro-batches of at most `recipe.device_batch`
        images whose losses are weighted by their share of the batch (their gradients sum to the
        whole batch's). Returns the batch's loss (with its graph when there is one micro-batch) and
        the batch as the hooks left it."""
        forward = self._compiled or self._ddp or self.model
        count = self.recipe.micro_batches(len(y))
        parts = list(zip(x.tensor_split(count), y.tensor_split(count)))
        total, seen = None, []
        for i, (xi, yi) in enumerate(parts):
            self.micro_batch = i
            share = len(yi) / len(y)
            for h in self.hooks:
                replaced = h.before_forward(self, xi, yi)
                if replaced is not None:
                    xi, yi = replaced
            seen.append((xi, yi))
            self.batch = (xi, yi)
            if i == 0:
                self._set_lr()
            # DDP averages gradients over the ranks once per optimizer step, at the last micro-batch
            no_sync = self._ddp.no_sync() if self._ddp is not None and i < count - 1 else contextlib.nullcontext()
            with no_sync:
                with self.autocast():
                    outputs = forward(xi)
                    loss = F.cross_entropy(outputs.float(), yi, label_smoothing=self.recipe.label_smoothing)
                    for h in self.hooks:
                        loss = h.compute_loss(self, xi, outputs, yi, loss)
                    for h in self.hooks:
                        extra = h.extra_loss(self, xi, outputs, yi)
                        if extra is not None:
                            loss = loss + extra
                if count > 1:
                    loss = loss * share
                if i == 0:
                    self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            total = loss if count == 1 else loss.detach() + (0 if total is None else total)
        self.micro_batch = 0
        batch = seen[0] if count == 1 else (torch.cat([b[0] for b in seen]), torch.cat([b[1] for b in seen]))
        return total, batch

    # --- training cost ---------------------------------------------------------------------
    def add_macs(self, forward: int = 0, backward: int = 0) -> None:
        """Add work the model's own forward/backward does not show (a teacher's forward, a
        decoder, a dense-gradient pass), in MACs, to this trainer's compute count."""
        self.compute.add(forward, backward)

    def forward_macs_per_image(self, input_shape: Sequence[int]) -> int:
        """Per-image forward MACs of the model now: masked weights cost density x dense MACs."""
        input_shape = tuple(input_shape)
        if self._layer_macs is None or self._layer_macs[0] != input_shape:
            from sparsebench.measure.flops import count_macs

            try:
                report = count_macs(self.model, input_shape)
            except Exception as e:      # the cost is a record field; never the reason a run fails
                warnings.warn(f"training MACs not counted: count_macs failed on {type(self.model).__name__}: {e}")
                self.compute.complete = False
                self._layer_macs = (input_shape, 0, {})
            else:
                by_weight = {id(m.weight): report.layers[name].macs for name, m in self.model.named_modules()
                             if name in report.layers}
                self._layer_macs = (input_shape, report.macs, by_weight)
            self._forward_macs = None
        _, dense, by_weight = self._layer_macs
        versions = tuple((id(h), h.version) for h in self.hooks)
        if self._forward_macs is None or self._forward_macs[0] != versions:
            macs = dense
            for h in self.hooks:
                for weight, density in h.masked_densities().items():
                    layer = by_weight.get(weight, 0)
                    macs += int(round(layer * density)) - layer
            self._forward_macs = (versions, macs)
        return self._forward_macs[1]

    def _count_step(self, forward: int) -> None:
        needs_weight_grads = any(p.requires_grad for p in self.model.parameters())
        self.compute.add(forward, (2 if needs_weight_grads else 1) * forward)

    # --- resume ------------------------------------------------------------------------------
    def _extra_params(self) -> List[torch.nn.Parameter]:
        in_model = {id(p) for p in self.model.parameters()}
        return [p for g in self._groups for p in g["params"] if id(p) not in in_model]

    def state_dict(self) -> dict:
        """Everything a resumed fit needs from this trainer (RNG states are the checkpoint's)."""
        self._check_finite()             # the saved curve holds every step taken
        return {
            "step": self.step, "schedule_start": self.schedule_start, "schedule_steps": self.schedule_steps,
            "model": self.model.state_dict(),
            "extra_params": [p.detach() for p in self._extra_params()],
            "optimizer": self.optimizer.state_dict(),
            "budget": self.budget.state_dict() if self.budget is not None else None,
            "compute": self.compute.state_dict(),
            "curve": self.curve.state_dict(),
            "hooks": [h.state_dict() for h in self.hooks],
            "data": self._data.state_dict() if isinstance(self._data, LoaderPosition) else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["hooks"]) != len(self.hooks):
            raise ResumeMismatch(f"checkpoint has {len(state['hooks'])} hooks, the trainer {len(self.hooks)}")
        self.step, self.schedule_start = state["step"], state["schedule_start"]
        self.schedule_steps = state["schedule_steps"]
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            for p, saved in zip(self._extra_params(), state["extra_params"], strict=True):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.budget is not None and state["budget"] is not None:
            self.budget.load_state_dict(state["budget"])
        self.compute.load_state_dict(state["compute"])
        if "curve" in state:
            self.curve.load_state_dict(state["curve"])
        for h, saved in zip(self.hooks, state["hooks"]):
            h.load_state_dict(saved)
        if state["data"] is not None:
            if not isinstance(self._data, LoaderPosition):
                self._data = LoaderPosition(self.train_loader)
            self._data.load_state_dict(state["data"])

    def _save(self, index: int, fit: dict) -> None:
        self.checkpoints.save(index, {"trainer": self.state_dict(), "rng": rng_state(), "fit": fit})
        if self._watch is not None:      # a resume skips the curve's points up to here: they must be on disk
            self._watch.flush()

    def _resume(self, index: int, signature: dict) -> Optional[dict]:
        saved = self.checkpoints.load(index)
        if saved is None:
            return None
        if saved["fit"]["signature"] != signature:
            raise ResumeMismatch(
                f"{self.checkpoints.path(index)} was saved by another fit ({saved['fit']['signature']}, "
                f"now {signature}); delete {self.checkpoints.directory} to start the run over")
        self.load_state_dict(saved["trainer"])
        set_rng_state(saved["rng"])          # after the data position: re-reading batches draws random numbers
        self.checkpoints.resumed += 1
        self.checkpoints.restored_seconds += saved["fit"]["elapsed"]
        return saved["fit"]

    def fit(
        self,
        steps: int,
        val_loader: Optional[DataLoader] = None,
        eval_every: Optional[int] = None,
        progress: Optional[Callable[..., object]] = None,
        desc: str = "train",
    ) -> TrainResult:
        """Train `steps` steps; with a val loader, keep the best-val weights.

        The first call sets the LR schedule (warm-up + cosine) over its `steps`; later calls
        continue it (phases of one run), unless `restart_schedule` starts a new one.
        Model selection reads only the validation split; the test split is never touched here.
        """
        if self.schedule_steps is None:
            self.schedule_steps = steps
        start = time.perf_counter()
        paused = timing_section().paused_seconds      # waits for other workers' timing are not this fit's cost
        result = TrainResult(steps=0, wall_seconds=0.0)
        best_state = None
        first, done, elapsed = self.step, 0, 0.0
        index = self.checkpoints.next_fit() if self.checkpoints is not None else None
        signature = {"steps": steps, "desc": desc, "hooks": [type(h).__name__ for h in self.hooks],
                     "eval_every": eval_every if val_loader is not None else None}
        if index is not None:
            saved = self._resume(index, signature)
            if saved is not None:
                result = TrainResult(**saved["result"])
                if saved["completed"]:
                    return result
                first, done, elapsed, best_state = saved["first"], saved["done"], saved["elapsed"], saved["best_state"]

        def progress_state(completed: bool, done: int) -> dict:
            result.wall_seconds = elapsed + time.perf_counter() - start - (timing_section().paused_seconds - paused)
            return {"signature": signature, "completed": completed, "first": first, "done": done,
                    "elapsed": result.wall_seconds, "best_state": None if completed else best_state,
                    "result": dataclasses.asdict(result)}

        bar = progress(total=steps, desc=desc) if progress else None
        if bar is not None and done:
            bar.update(done)
        every = self.checkpoints.every if self.checkpoints is not None else None
        for i in range(done, steps):
            loss = self.train_step()
            if bar is not None:
                bar.update(1)
                if i % 10 == 0 and self.last_loss is not None:
                    last_val = {"val": f"{100 * result.history[-1]['val_top1']:.2f}%"} if result.history else {}
                    bar.set_postfix(loss=f"{self.last_loss:.3f}", **last_val)
            last = i == steps - 1
            if val_loader is not None and eval_every and ((i + 1) % eval_every == 0 or last):
                self._check_finite()     # never select on a model trained past a non-finite loss
                acc = evaluate(self.model, val_loader, self.device, self.num_classes, precision=self.recipe.precision)
                result.history.append({"step": self.step, "val_top1": acc.top1, "train_loss": self.last_loss})
                self.curve.add_val(self.position, acc.top1)
                if result.best_val_top1 is None or acc.top1 > result.best_val_top1:
                    result.best_val_top1, result.best_step = acc.top1, self.step
                    best_state = copy.deepcopy(self.model.state_dict())
            if every and not last and (i + 1) % every == 0:
                result.steps = self.step - first
                self._save(index, progress_state(False, i + 1))
        if bar is not None:
            bar.close()
        self.finish()
        if best_state is not None:
            self.model.load_state_dict(best_state)
        result.steps = self.step - first
        result.wall_seconds = elapsed + time.perf_counter() - start - (timing_section().paused_seconds - paused)
        if index is not None:
            self._save(index, progress_state(True, steps))
        return result
