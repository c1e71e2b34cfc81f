"""Each stage of runners/pipeline.py on its own, and the run's status when a stage goes wrong."""
import json

import pytest
import torch
from torch import nn

from sparsebench.errors import Diverged
from sparsebench.methods import METHODS, Method, Outcome, create_method, register_method
from sparsebench.methods.base import TrainerHook
from sparsebench.models import model_card
from sparsebench.runners.pipeline import (
    RunOptions, StageError, data_stage, dense_stage, execute, finetune_stage, method_stage, model_factory,
    prunable_policy, validate,
)
from sparsebench.store import RecordStore
from sparsebench.training.masks import MaskSet, global_topk_masks, prunable_weights

from conftest import tiny_spec


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One dense checkpoint cache for the module: the stages after it are what is tested."""
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture
def registered():
    names = []

    def register(name):
        names.append(name)
        return register_method(name)

    yield register
    for name in names:
        METHODS._entries.pop(name, None)


def stages_until_method(spec, cache):
    data = data_stage(spec, RunOptions(out=cache))
    make_model = model_factory(spec, data.info, torch.device("cpu"))
    dense = dense_stage(spec, data, make_model, torch.device("cpu"), cache)
    return data, make_model, dense


def test_data_stage_counts_the_steps_of_every_phase(cache):
    spec = tiny_spec()
    data = data_stage(spec, RunOptions(out=cache))
    n_train = data.split["n_train"]
    assert data.steps_per_epoch == -(-n_train // spec.recipe.batch_size)
    assert data.pretrain_steps == spec.recipe.steps(spec.recipe.pretrain_epochs, n_train)
    assert data.search_steps == spec.recipe.steps(spec.recipe.search_epochs, n_train) < data.pretrain_steps
    assert set(data.loaders) == {"train_dense", "train_method", "train_finetune", "val", "test"}
    assert data.input_size == (data.info.in_chans, 16, 16)


def test_dense_and_method_stages_hand_over_the_dense_weights(cache):
    spec = tiny_spec("magnitude-global", target="sparsity=0.5")
    data, make_model, dense = stages_until_method(spec, cache)
    assert not dense.model.training and dense.macs.macs > 0
    result = method_stage(spec, validate(spec), data, dense, make_model, torch.device("cpu"))
    assert result.diverged is None and result.steps == 0 and result.budget == data.search_steps
    # a pretrained-start method works on a copy: the dense model stays as the checkpoint left it
    assert all(bool((p != 0).all()) for n, p in prunable_weights(dense.model).items())


def test_method_stage_stops_at_a_non_finite_loss(cache, registered):
    class NaNLoss(TrainerHook):
        def extra_loss(self, trainer, inputs, outputs, targets):
            return torch.tensor(float("nan")) if trainer.step == 2 else None

    @registered("test-nan-loss")
    class NaNMethod(Method):
        granularity = "unstructured"

        def run(self, ctx):
            ctx.make_trainer(hooks=[NaNLoss()]).fit(ctx.budget.limit)
            return Outcome(ctx.model, "masked")

    spec = tiny_spec("test-nan-loss")
    data, make_model, dense = stages_until_method(spec, cache)
    result = method_stage(spec, validate(spec), data, dense, make_model, torch.device("cpu"))
    assert isinstance(result.diverged, Diverged) and result.diverged.stage == "method"
    # the third step was started (and counted) but stopped before its optimizer update
    assert result.outcome is None and result.steps == 3


class NaNWhenTraining(nn.Module):
    """Finite in eval mode, NaN in train mode: diverges only once fine-tuning starts."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out * float("nan") if self.training else out


def test_finetune_stage_stops_at_a_non_finite_loss(cache):
    spec = tiny_spec()
    data, _, dense = stages_until_method(spec, cache)
    result = finetune_stage(spec, Outcome(NaNWhenTraining(dense.model), "masked"), data, torch.device("cpu"))
    assert result.diverged is not None and result.diverged.stage == "finetune" and result.steps == 0


def test_a_diverged_run_is_recorded_with_status_and_no_metrics(tmp_path, cache, registered):
    @registered("test-diverge-finetune")
    class Diverging(Method):
        granularity = "unstructured"

        def run(self, ctx):
            return Outcome(NaNWhenTraining(ctx.model), "masked")

    record = execute(tiny_spec("test-diverge-finetune"), RunOptions(out=tmp_path, cache_dir=cache))
    assert record.status == "diverged" and record.target_met is False and "finetune" in record.error
    assert record.test_top1 is None and record.macs is None and record.selection["test_evaluations"] == 0
    assert RecordStore(tmp_path).read(record.run_id) == record


def test_nan_in_the_compaction_check_is_a_divergence_and_a_mismatch_a_clear_error(cache, registered):
    @registered("test-compaction")
    class Compaction(Method):
        granularity = "channel"
        _poison = False

        def run(self, ctx):
            if self._poison:
                with torch.no_grad():
                    next(ctx.model.parameters()).fill_(float("nan"))
                raise AssertionError("compacted model differs from the masked one by nan (> 0.0001)")
            raise AssertionError("compacted model differs from the masked one by 3.00e-01 (> 0.0001)")

    spec = tiny_spec("test-compaction", target="flops=0.5")
    data, make_model, dense = stages_until_method(spec, cache)
    method = validate(spec)
    method._poison = True
    result = method_stage(spec, method, data, dense, make_model, torch.device("cpu"))
    assert result.diverged is not None and "compaction" in result.diverged.reason
    method._poison = False
    with pytest.raises(StageError, match=r"^method stage \(test-compaction\): compacted model differs .* 3.00e-01"):
        method_stage(spec, method, data, dense, make_model, torch.device("cpu"))


def test_a_missed_target_is_recorded_and_a_declared_tolerance_is_used(tmp_path, cache, registered):
    @registered("test-undershoot")
    class Undershoot(Method):
        """Prunes 0.02 less than asked."""
        granularity = "unstructured"

        def run(self, ctx):
            params = prunable_weights(ctx.model)
            masks = MaskSet(ctx.model, global_topk_masks({n: p.abs() for n, p in params.items()},
                                                         ctx.target.value - 0.02))
            return Outcome(ctx.model, "masked", masks=masks, prunable=list(params))

    record = execute(tiny_spec("test-undershoot", target="sparsity=0.6"), RunOptions(out=tmp_path, cache_dir=cache))
    assert record.status == "missed_target" and not record.target_met
    assert record.achieved_sparsity == pytest.approx(0.58, abs=0.002)
    stored = json.loads(RecordStore(tmp_path).path(record.run_id).read_text())
    assert stored["tolerance"] == {"below": 0.005, "above": 0.005}
    Undershoot.sparsity_tolerance = 0.03
    record = execute(tiny_spec("test-undershoot", target="sparsity=0.6"),
                     RunOptions(out=tmp_path / "b", cache_dir=cache))
    assert record.status == "ok" and record.tolerance.below == 0.03


@pytest.mark.parametrize("model_name", ["resnet20_tiny", "vit_cifar_tiny"])
def test_prunable_policy_names_the_layers_left_dense(model_name, cpu_model_factory):
    card = model_card(model_name)
    model = cpu_model_factory(model_name)
    everything = list(prunable_weights(model))
    assert prunable_policy(everything, card).policy == "all conv/linear weights"
    inner = list(prunable_weights(model, exclude=card.edge_layers))
    policy = prunable_policy(inner, card)
    assert policy.policy == "input layer and classifier dense" and policy.dense_layers == list(card.edge_layers)
    assert policy.tensors == len(everything) - 2
    assert prunable_policy(everything[1:], card).policy == "input layer dense"


def test_unstructured_record_states_its_prunable_set(tmp_path, cache):
    record = execute(tiny_spec("random", target="sparsity=0.5"), RunOptions(out=tmp_path, cache_dir=cache))
    assert record.prunable.policy == "input layer and classifier dense"
    assert record.prunable.dense_layers == ["conv1", "fc"] and record.plugin is None
    assert create_method("random").config.skip_first is True
