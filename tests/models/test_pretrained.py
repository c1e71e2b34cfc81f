import pytest
import torch

from sparsebench.errors import SpecError
from sparsebench.models import create_model
from sparsebench.models.pretrained import load_pretrained, state_dict_sha256


def test_local_weights_load_all_but_the_mismatched_head(tmp_path):
    source = create_model("resnet20_tiny", num_classes=100)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    target = create_model("resnet20_tiny", num_classes=10)
    fc_before = target.fc.weight.clone()
    sha = load_pretrained(target, "resnet20_tiny", str(path))
    assert sha == state_dict_sha256(source.state_dict())
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    assert torch.equal(target.fc.weight, fc_before)          # 100 vs 10 classes: kept fresh


def test_missing_or_foreign_weights_are_clear_errors(tmp_path):
    model = create_model("resnet20_tiny")
    with pytest.raises(SpecError, match="not found"):
        load_pretrained(model, "resnet20_tiny", str(tmp_path / "nope.pt"))
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(SpecError, match="share no tensor"):
        load_pretrained(model, "resnet20_tiny", str(tmp_path / "foreign.pt"))


def test_hub_offline_is_a_clear_error(monkeypatch):
    import torchvision

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(torchvision.models, "get_model_weights", offline)
    with pytest.raises(SpecError, match="could not fetch hub weights for 'resnet18'.*--weights PATH"):
        load_pretrained(create_model("resnet18", num_classes=10), "resnet18", "hub")
    with pytest.raises(SpecError, match="no hub weights for model 'resnet20_tiny'"):
        load_pretrained(create_model("resnet20_tiny"), "resnet20_tiny", "hub")


def test_record_names_the_weights(tmp_path):
    from sparsebench.runners.pipeline import RunOptions, execute

    from conftest import tiny_spec

    path = tmp_path / "w.pt"
    torch.save(create_model("resnet20_tiny", num_classes=10, img_size=16).state_dict(), path)
    record = execute(tiny_spec("dense", target="none", pretrained=str(path)), RunOptions(out=tmp_path / "out"))
    assert record.dense_checkpoint["pretrained_sha256"] == state_dict_sha256(torch.load(path))
