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
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from sparsebench.errors import Diverged
from sparsebench.specs import Recipe


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


@dataclass
class Accuracy:
    top1: float
    top5: Optional[float]
    loss: float
    n: int


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int) -> Accuracy:
    """Accuracy as sum of correct over sum of samples (never a mean of batch means)."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum, n = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, num_classes), dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(dim=1).sum())
        n += len(y)
    model.train(was_training)
    return Accuracy(correct1 / n, correct5 / n if num_classes > 10 else None, loss_sum / n, n)


def _ordered(hooks: Iterable[TrainerHook]) -> List[TrainerHook]:
    return sorted(hooks, key=lambda h: getattr(h, "order", HookOrder.DEFAULT))   # stable: ties keep their order


def cycle(loader: DataLoader):
    while True:
        yield from loader


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
    ):
        """`train_model_params=False` freezes the model (only `param_groups` learn);
        `model_mode="eval"` keeps BN statistics and dropout frozen during training steps
        (a search over a fixed backbone); `no_weight_decay` lists model parameters that must
        not decay (e.g. a token selector)."""
        if model_mode not in ("train", "eval"):
            raise ValueError(f"model_mode must be 'train' or 'eval', got {model_mode!r}")
        self.model, self.train_loader, self.recipe = model, train_loader, recipe
        self.device, self.num_classes, self.lr = device, num_classes, lr
        self.hooks: List[TrainerHook] = _ordered(hooks)
        self.budget = budget
        self.model_mode = model_mode
        self.step = 0                     # optimizer steps taken by this trainer
        self.schedule_start, self.schedule_steps = 0, None   # LR schedule horizon
        self.loss: Optional[torch.Tensor] = None
        self.batch = None
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
        self._data = None

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
        enabled = self.recipe.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def next_batch(self):
        if self._data is None:
            self._data = cycle(self.train_loader)
        x, y = next(self._data)
        return x.to(self.device), y.to(self.device)

    def train_step(self) -> torch.Tensor:
        """One optimizer step: forward, loss (+ hooks' terms), backward, hooks, step, hooks."""
        if self.schedule_steps is None:
            raise RuntimeError("no LR schedule: call fit(steps) or restart_schedule(steps) first")
        if self.budget is not None:
            self.budget.spend(1)
        self.model.train(self.model_mode == "train")
        x, y = self.next_batch()
        for h in self.hooks:
            replaced = h.before_forward(self, x, y)
            if replaced is not None:
                x, y = replaced
        self.batch = (x, y)
        self._set_lr()
        with self.autocast():
            outputs = self.model(x)
            loss = F.cross_entropy(outputs.float(), y, label_smoothing=self.recipe.label_smoothing)
            for h in self.hooks:
                loss = h.compute_loss(self, x, outputs, y, loss)
            for h in self.hooks:
                extra = h.extra_loss(self, x, outputs, y)
                if extra is not None:
                    loss = loss + extra
        if not bool(torch.isfinite(loss.detach())):
            raise Diverged(f"non-finite training loss ({float(loss.detach()):g}) at step {self.step + 1}")
        self.loss = loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for h in self.hooks:
            h.after_backward(self)
        self.optimizer.step()
        self.step += 1
        for h in self.hooks:
            h.after_step(self)
        return loss.detach()

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
        result = TrainResult(steps=0, wall_seconds=0.0)
        best_state = None
        bar = progress(total=steps, desc=desc) if progress else None
        first = self.step
        for i in range(steps):
            loss = self.train_step()
            if bar is not None:
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{float(loss):.3f}")
            last = i == steps - 1
            if val_loader is not None and eval_every and ((i + 1) % eval_every == 0 or last):
                acc = evaluate(self.model, val_loader, self.device, self.num_classes)
                result.history.append({"step": self.step, "val_top1": acc.top1, "train_loss": float(loss)})
                if result.best_val_top1 is None or acc.top1 > result.best_val_top1:
                    result.best_val_top1, result.best_step = acc.top1, self.step
                    best_state = copy.deepcopy(self.model.state_dict())
        if bar is not None:
            bar.close()
        if best_state is not None:
            self.model.load_state_dict(best_state)
        result.steps = self.step - first
        result.wall_seconds = time.perf_counter() - start
        return result
