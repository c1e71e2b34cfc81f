import json
import subprocess
import sys

import pytest

from sparsebench.specs import DataSpec, MeasureSpec, Recipe, RunSpec, SpecError, Target, stable_hash


def test_hash_is_stable_across_processes_and_key_order():
    spec = RunSpec(method="gmp", model="resnet20_tiny", dataset="digits", target=Target("sparsity", 0.9),
                   method_args=(("scope", "layer"),))
    code = ("from sparsebench.specs import RunSpec, Target;"
            "print(RunSpec(method='gmp', model='resnet20_tiny', dataset='digits', target=Target('sparsity', 0.9),"
            "method_args=(('scope', 'layer'),)).hash)")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert spec.hash == other
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": (1, 2), "a": 1})


def test_hash_round_trips_through_dict_and_json():
    spec = RunSpec(method="random", model="vit_cifar_tiny", dataset="digits", target=Target("sparsity", 0.5),
                   seed=3, recipe=Recipe(lr=0.1), data=DataSpec(img_size=16), measure=MeasureSpec(batch_sizes=(1, 32)))
    again = RunSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.hash == spec.hash


@pytest.mark.parametrize("change", [
    dict(seed=1), dict(target=Target("sparsity", 0.8)), dict(recipe=Recipe(lr=0.01)),
    dict(method_args=(("scope", "global"),)), dict(data=DataSpec(val_fraction=0.2)),
])
def test_every_field_changes_the_hash(change):
    import dataclasses

    spec = RunSpec(method="gmp", model="resnet20_tiny", dataset="digits", target=Target("sparsity", 0.9))
    assert dataclasses.replace(spec, **change).hash != spec.hash


def test_dense_key_is_shared_across_methods_and_targets():
    a = RunSpec(method="gmp", model="resnet20_tiny", dataset="digits", target=Target("sparsity", 0.9))
    b = RunSpec(method="l1-channel", model="resnet20_tiny", dataset="digits", target=Target("flops", 0.5),
                recipe=Recipe(finetune_epochs=7, search_epochs=3))
    assert stable_hash(a.dense_key()) == stable_hash(b.dense_key())
    assert stable_hash(a.dense_key()) != stable_hash(RunSpec(method="gmp", model="resnet20_tiny",
                                                              dataset="digits", seed=1).dense_key())


@pytest.mark.parametrize("text, named", [("sparsity=1.5", "1.5"), ("sparsity=0", "sparsity=0"),
                                         ("flops=-0.1", "-0.1"), ("flops=abc", "abc"), ("speed=0.5", "speed"),
                                         ("0.5", "0.5")])
def test_bad_targets_are_rejected_with_the_value(text, named):
    with pytest.raises(SpecError) as e:
        Target.parse(text)
    assert named in str(e.value) and "allowed" in str(e.value) or "expected" in str(e.value)


def test_target_parse_and_str():
    assert str(Target.parse("sparsity=0.9")) == "sparsity=0.9"
    assert Target.parse("none") == Target()
