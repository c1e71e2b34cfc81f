"""2:4 semi-structured path: exact masks, honest runtime detection, conversion on CUDA."""
import pytest
import torch
from torch import nn

from sparsebench.measure.sparse24 import (
    is_2to4, mask_2to4, min_shape, prune_2to4_, semi_structured_support, to_semi_structured,
)


def test_mask_keeps_the_two_largest_of_every_four():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    mask = mask_2to4(w)
    groups = mask.reshape(32, 16, 4)
    assert mask.dtype == torch.bool and bool((groups.sum(-1) == 2).all())      # exactly 2 zeros per 4
    mags = w.abs().reshape(32, 16, 4)
    kept_min = mags.masked_fill(~groups, float("inf")).min(-1).values
    pruned_max = mags.masked_fill(groups, -1.0).max(-1).values
    assert bool((kept_min >= pruned_max).all())


def test_mask_with_ties_and_zeros_still_keeps_exactly_two():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    assert mask_2to4(w).reshape(2, 4).sum(-1).tolist() == [2, 2]


def test_prune_in_place_and_check():
    lin = nn.Linear(16, 8)
    assert not is_2to4(lin.weight)
    mask = prune_2to4_(lin)
    assert is_2to4(lin.weight) and torch.equal(lin.weight != 0, mask)
    with pytest.raises(ValueError):
        mask_2to4(torch.randn(4, 6))
    with pytest.raises(ValueError):
        mask_2to4(torch.randn(4, 4, 3, 3))


def test_no_support_on_cpu_with_a_reason():
    ok, reason = semi_structured_support(torch.device("cpu"))
    assert ok is False and "CUDA" in reason


def test_cpu_model_is_left_dense_with_reasons():
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))
    prune_2to4_(model[0])
    model, converted, skipped = to_semi_structured(model, torch.float16)
    assert converted == 0 and [n for n, _ in skipped] == ["0", "2"]
    assert all("CUDA" in r for _, r in skipped) and model[0].weight.dtype == torch.float16


def test_min_shape_known_for_half_types():
    for dtype in (torch.float16, torch.bfloat16):
        rows, cols = min_shape(dtype)
        assert rows > 0 and cols > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_conversion_matches_dense():
    ok, reason = semi_structured_support("cuda", torch.float16)
    if not ok:
        pytest.skip(f"no 2:4 kernel here: {reason}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.Linear(256, 10))
    for lin in (model[0], model[2], model[3]):
        prune_2to4_(lin)
    model = model.cuda().half().eval()
    x = torch.randn(4, 17, 256, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        dense = model(x)
    model, converted, skipped = to_semi_structured(model, torch.float16)
    assert converted == 2                                   # the 10-row classifier is below the minimum block
    assert [n for n, _ in skipped] == ["3"] and "shape" in skipped[0][1]
    with torch.inference_mode():
        sparse = model(x)
    torch.testing.assert_close(sparse.float(), dense.float(), atol=2e-2, rtol=2e-2)
