import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.measure.flops import count_macs, unfused_attention
from sparsebench.models import create_model

# Reference totals at 224 px, batch 1 (measurement spec §1; published figures in brackets).
REFERENCE_GMACS = [("resnet18", 1.814), ("resnet50", 4.089), ("deit_tiny", 1.254), ("deit_small", 4.599), ("deit_base", 17.56)]


@pytest.mark.parametrize("name, gmacs", REFERENCE_GMACS)
def test_published_totals_within_one_percent(name, gmacs):
    model = create_model(name, num_classes=1000, img_size=224)
    assert count_macs(model, (3, 224, 224)).macs / 1e9 == pytest.approx(gmacs, rel=0.01)


def test_vgg16_bn_reference():
    assert count_macs(timm.create_model("vgg16_bn"), (3, 224, 224)).macs / 1e9 == pytest.approx(15.47, rel=0.01)


@pytest.mark.parametrize("stride, padding, dilation, groups", [(1, 1, 1, 1), (2, 0, 1, 1), (1, 2, 2, 1), (1, 1, 1, 4)])
def test_conv_matches_analytic_count(stride, padding, dilation, groups):
    conv = nn.Conv2d(8, 12, 3, stride=stride, padding=padding, dilation=dilation, groups=groups)
    out = conv(torch.zeros(1, 8, 15, 15))
    expected = out.shape[-1] * out.shape[-2] * 12 * (8 // groups) * 9
    assert count_macs(conv, (8, 15, 15)).macs == expected


def test_linear_on_tokens():
    layer = nn.Linear(16, 24)
    assert count_macs(layer, (7, 16)).macs == 7 * 16 * 24


@pytest.mark.parametrize("fused", [True, False])
def test_attention_matmuls_are_counted_fused_or_not(fused):
    from timm.layers import Attention

    dim, heads, tokens = 32, 4, 10
    attn = Attention(dim, num_heads=heads, qkv_bias=True)
    attn.fused_attn = fused
    report = count_macs(attn, (tokens, dim), fused_attention=True)
    linear = tokens * dim * 3 * dim + tokens * dim * dim
    attention = 2 * tokens * tokens * dim
    assert report.attention_macs == attention
    assert report.macs == linear + attention


def test_direct_sdpa_call_is_counted():
    class Direct(nn.Module):
        def forward(self, x):
            q = x.view(1, 2, 5, 8)
            return F.scaled_dot_product_attention(q, q, q)

    report = count_macs(Direct(), (80,))
    assert report.macs == 2 * 5 * 5 * (8 + 8) == report.attention_macs


def test_fused_flag_is_restored():
    model = create_model("vit_cifar_tiny", img_size=16)
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    with unfused_attention(model):
        assert not any(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == flags


def test_sparsity_aware_count_scales_each_layer_by_its_density():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 10, bias=False))
    with torch.no_grad():
        model[0].weight[:4] = 0           # half the conv zeroed, linear dense
    report = count_macs(model, (3, 4, 4))
    conv = 16 * 8 * 3 * 9
    linear = 128 * 10
    assert report.macs == conv + linear
    assert report.macs_effective == conv // 2 + linear
    assert report.layers["0"].density == 0.5
