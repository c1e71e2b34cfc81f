"""Our conv + linear + matmul MACs equal fvcore's (an independent, jit-trace-based counter)
on standard architectures at 224 px, random init, fused attention off."""
import pytest

from sparsebench.measure.flops import count_macs, fvcore_macs
from sparsebench.models import create_model


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "deit_tiny", "deit_small"])
def test_macs_match_fvcore(name):
    model = create_model(name, num_classes=1000, img_size=224)
    ours = count_macs(model, (3, 224, 224))
    theirs = fvcore_macs(model, (3, 224, 224))
    # exact: both count conv, linear and attention matmuls; neither counts norms or activations
    assert ours.macs == theirs
    if name.startswith("deit"):
        assert ours.attention_macs > 0


def test_flops_cross_check_command_prints_both_counts(capsys):
    from sparsebench.cli import main

    assert main(["flops", "resnet18_tiny", "--img-size", "32", "--num-classes", "10", "--cross-check"]) == 0
    out = capsys.readouterr().out
    ours = count_macs(create_model("resnet18_tiny", num_classes=10, img_size=32), (3, 32, 32)).macs
    assert f"sparsebench {ours:>15,d} MACs" in out and f"fvcore      {ours:>15,d} MACs" in out
    assert "difference 0 MACs" in out
