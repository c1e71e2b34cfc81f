"""CSR and auto realizations of unstructured masks: exact against the masked model, never slower
than dense in their own calibration, recorded per layer."""
import pytest
import torch
from torch import nn

from sparsebench.measure import unstructured
from sparsebench.measure.realize import realize
from sparsebench.measure.unstructured import Calibration, CSRConv2d, CSRLinear
from sparsebench.models import create_model
from sparsebench.training.masks import keep_counts, layer_densities, layerwise_topk_masks, prunable_weights

CPU = torch.device("cpu")


def magnitude_pruned(name: str, sparsity: float, **kwargs) -> nn.Module:
    """`name` with per-layer magnitude masks applied, input layer and classifier dense."""
    torch.manual_seed(0)
    model = create_model(name, img_size=16, **kwargs).eval()
    params = prunable_weights(model, skip_first=True, skip_last=True)
    masks = layerwise_topk_masks({n: p.abs() for n, p in params.items()},
                                 keep_counts(params, layer_densities(params, sparsity)))
    with torch.no_grad():
        for n, p in params.items():
            p.mul_(masks[n])
    return model


def test_csr_linear_equals_linear_on_tokens_and_rows():
    torch.manual_seed(0)
    for bias in (True, False):
        linear = nn.Linear(24, 40, bias=bias)
        with torch.no_grad():
            linear.weight[torch.rand_like(linear.weight) < 0.8] = 0
        sparse = CSRLinear(linear)
        for x in (torch.randn(5, 24), torch.randn(2, 7, 24)):
            with torch.inference_mode():
                assert torch.allclose(sparse(x), linear(x), atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                    dict(kernel_size=1), dict(kernel_size=1, stride=2, bias=False),
                                    dict(kernel_size=(3, 1), dilation=2, padding=(2, 0))])
def test_csr_conv_equals_conv(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, **kwargs)
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) < 0.7] = 0
    sparse = CSRConv2d(conv)
    for batch in (1, 3):
        x = torch.randn(batch, 6, 9, 8)
        with torch.inference_mode():
            assert torch.allclose(sparse(x), conv(x), atol=1e-5)


def test_grouped_conv_has_no_csr_lowering():
    with pytest.raises(ValueError, match="grouped"):
        CSRConv2d(nn.Conv2d(4, 4, 3, groups=4))


@pytest.mark.parametrize("name", ["resnet20_tiny", "vit_cifar_tiny"])
@pytest.mark.parametrize("kernel", ["csr", "auto"])
def test_realization_equals_the_masked_model(name, kernel):
    model = magnitude_pruned(name, 0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = Calibration(input_size=(3, 16, 16), batch=4, max_seconds=1.0, block_seconds=1e-4, pairs=2)
    r = realize(model, "masked", CPU, calibration=calibration, kernel=kernel)
    assert r.realizable and r.kind == kernel and r.model is not model
    x = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(r.model(x), model(x), atol=1e-4)
    # the masked model is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    layers = r.details["layers"]
    on_csr = [e for e in layers if e["kernel"] == "csr"]
    assert r.details["sparse_layers"] == len(on_csr) == sum(
        isinstance(m, (CSRLinear, CSRConv2d)) for m in r.model.modules())
    if kernel == "csr":          # every pruned layer, and no unpruned one (input layer, classifier)
        assert len(on_csr) == sum(e["density"] < 1 and e["reason"] is None or e["kernel"] == "csr" for e in layers)
        assert on_csr and all(e["density"] < 0.2 for e in on_csr)
        assert all(e["reason"] == "no zeros" for e in layers if e["kernel"] == "dense")
    for e in layers:
        assert set(e) >= {"layer", "type", "shape", "density", "kernel", "dense_ms", "csr_ms", "reason"}
        if kernel == "auto" and e["kernel"] == "csr":       # on real timings too: only where CSR won
            assert e["csr_ms"] <= 0.9 * e["dense_ms"]


def test_auto_never_picks_a_kernel_slower_than_dense_in_its_calibration(monkeypatch):
    """Whatever the timings, a layer is on CSR only where CSR timed at most margin × dense; here the
    timer says CSR is slower on every other layer."""
    model = magnitude_pruned("resnet20_tiny", 0.9)

    def fake_timer(fn, x, number, cuda):
        layer = fn.__self__                         # a bound forward
        if not isinstance(layer, (CSRLinear, CSRConv2d)):
            return 1e-3
        return 0.5e-3 if layer.values.numel() % 2 else 0.92e-3      # a win on some layers, too close on others

    monkeypatch.setattr(unstructured, "_time_calls", fake_timer)
    r = realize(model, "masked", CPU, calibration=Calibration(input_size=(3, 16, 16), batch=2, max_seconds=30))
    timed = [e for e in r.details["layers"] if e["dense_ms"] is not None]
    assert timed and {e["kernel"] for e in timed} == {"dense", "csr"}
    for e in timed:
        assert (e["kernel"] == "csr") == (e["csr_ms"] <= 0.9 * e["dense_ms"])
        if e["kernel"] == "csr":
            assert e["csr_ms"] < e["dense_ms"]


def test_auto_with_no_winner_is_the_masked_model_run_dense(monkeypatch):
    model = magnitude_pruned("resnet20_tiny", 0.9)
    monkeypatch.setattr(unstructured, "_time_calls",
                        lambda fn, x, number, cuda: 2e-3 if isinstance(fn.__self__, (CSRLinear, CSRConv2d)) else 1e-3)
    r = realize(model, "masked", CPU, calibration=Calibration(input_size=(3, 16, 16), batch=2))
    assert r.realizable and r.kind == "auto" and r.details["sparse_layers"] == 0
    assert "all dense" in r.details["summary"]
    assert not any(isinstance(m, (CSRLinear, CSRConv2d)) for m in r.model.modules())


def test_dense_layers_are_not_tried_and_the_time_cap_leaves_the_rest_dense():
    model = magnitude_pruned("resnet20_tiny", 0.5)
    r = realize(model, "masked", CPU, calibration=Calibration(input_size=(3, 16, 16), batch=2, max_seconds=0.0))
    reasons = [e["reason"] for e in r.details["layers"]]
    assert all(reason for reason in reasons)            # nothing timed: each layer says why
    assert any("CSR not tried" in reason for reason in reasons) or any("time cap" in reason for reason in reasons)
    r = realize(magnitude_pruned("resnet20_tiny", 0.9), "masked", CPU,
                calibration=Calibration(input_size=(3, 16, 16), batch=2, max_seconds=0.0))
    assert r.details["sparse_layers"] == 0
    assert {e["reason"] for e in r.details["layers"] if e["density"] < 0.7} == {"not calibrated: time cap"}


def test_a_layer_or_realization_that_disagrees_is_never_used(monkeypatch):
    model = magnitude_pruned("vit_cifar_tiny", 0.9)
    real_forward = CSRLinear.forward
    monkeypatch.setattr(CSRLinear, "forward", lambda self, x: real_forward(self, x) + 1.0)
    r = realize(model, "masked", CPU, calibration=Calibration(input_size=(3, 16, 16), batch=4), kernel="csr")
    # each CSR layer is checked against its dense layer: a wrong one stays dense and says why
    pruned = [e for e in r.details["layers"] if e["type"] == "Linear" and e["density"] < 1]
    assert pruned and all("disagrees with dense" in e["reason"] and e["kernel"] == "dense" for e in pruned)
    # right at the calibration batch (4), wrong on the probe (2 images): the model check catches it
    monkeypatch.setattr(CSRLinear, "forward",
                        lambda self, x: real_forward(self, x) + (1.0 if x.shape[0] == 2 else 0.0))
    r = realize(model, "masked", CPU, calibration=Calibration(input_size=(3, 16, 16), batch=4), kernel="csr")
    assert not r.realizable and r.model is None and "disagrees with the masked model" in r.reason


def test_without_calibration_the_realization_says_so():
    r = realize(magnitude_pruned("resnet20_tiny", 0.9), "masked", CPU)
    assert not r.realizable and r.model is None and "not calibrated" in r.reason


def test_auto_choices_round_trip_through_a_record_and_old_records_still_read():
    from conftest import make_record
    from sparsebench.store.record import Realization, RunRecord, plain

    r = realize(magnitude_pruned("vit_cifar_tiny", 0.9), "masked", CPU,
                calibration=Calibration(input_size=(3, 16, 16), batch=2, max_seconds=0.5))
    stored = Realization(r.realizable, r.kind, r.reason, r.dtype, plain(r.details))
    record = make_record("magnitude-global", realizable=True, speedup=1.2, realization=stored)
    again = RunRecord.from_json(record.to_json())
    assert again == record and again.realization.details["layers"] == stored.details["layers"]
    assert again.to_dict()["realization"]["calibration"]["batch"] == 2
    old = make_record("magnitude-global").to_dict()
    old["realization"] = {"realizable": False, "kind": None, "reason": "not realizable here: unstructured zeros "
                          "inside dense tensors; no sparse kernel used on cpu", "dtype": None}
    assert RunRecord.from_dict(old).realization.realizable is False


@pytest.mark.cuda
def test_auto_on_cuda_equals_the_masked_model():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = magnitude_pruned("vit_cifar_tiny", 0.9)
    device = torch.device("cuda")
    for kernel in ("csr", "auto"):
        r = realize(model, "masked", device, calibration=Calibration(input_size=(3, 16, 16), batch=8), kernel=kernel)
        assert r.realizable and r.details["calibration"]["device"] == "cuda"
        x = torch.randn(4, 3, 16, 16)
        with torch.inference_mode():
            assert torch.allclose(r.model(x.to(device)).cpu(), model(x), atol=1e-4)


def test_auto_is_chosen_again_at_each_batch_size_it_is_timed_at():
    from sparsebench.measure.latency import LatencySettings
    from sparsebench.measure.realize import compare_realized

    model = magnitude_pruned("vit_cifar_tiny", 0.9)
    dense = create_model("vit_cifar_tiny", img_size=16).eval()
    calibration = Calibration(input_size=(3, 16, 16), batch=4, max_seconds=0.5)
    r = realize(model, "masked", CPU, calibration=calibration)
    settings = LatencySettings(batch_sizes=(1, 4), min_run_time=0.01, rounds=2)
    timed = compare_realized(dense, model, r, (3, 16, 16), settings, CPU, calibration=calibration)
    assert set(timed) == {"1", "4"} and all(timed[b]["measured_speedup"] > 0 for b in timed)
    at_1, at_4 = timed["1"]["realization"], timed["4"]["realization"]
    assert at_4["calibrated_at_batch"] == 4 and "layers" not in at_4          # the record's own realization
    assert at_1["calibrated_at_batch"] == 1 and len(at_1["layers"]) == len(r.details["layers"])
    # a realization other than auto is timed as it is, at every batch
    plain = compare_realized(dense, model, realize(dense, "dense", CPU), (3, 16, 16), settings, CPU,
                             calibration=calibration)
    assert set(plain) == {"1", "4"} and "realization" not in plain["1"]
