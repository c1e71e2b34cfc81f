"""Pretrained starting points for the dense checkpoint: a local file, or the library hub.

`source` is a path to a state dict (`--weights PATH`), or `"hub"` (`--pretrained`) for the
ImageNet weights torchvision / timm publish for the registered model. Layers whose shape
differs (the classifier of a transfer dataset) keep their fresh initialisation. The
SHA-256 of the weights used is returned and stored in every record.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Dict

import torch
from torch import nn

from sparsebench.errors import SpecError

# registered model -> ("torchvision", weights enum name) or ("timm", model name)
HUB_WEIGHTS = {
    "resnet18": ("torchvision", "resnet18"),
    "resnet50": ("torchvision", "resnet50"),
    "mobilenet_v2": ("torchvision", "mobilenet_v2"),
    "deit_tiny": ("timm", "deit_tiny_patch16_224.fb_in1k"),
    "deit_small": ("timm", "deit_small_patch16_224.fb_in1k"),
}


def hub_state_dict(model_name: str) -> Dict[str, torch.Tensor]:
    if model_name not in HUB_WEIGHTS:
        raise SpecError(f"no hub weights for model {model_name!r}; allowed: {', '.join(sorted(HUB_WEIGHTS))} "
                        f"(or pass --weights PATH)")
    library, name = HUB_WEIGHTS[model_name]
    try:
        if library == "torchvision":
            import torchvision

            return torchvision.models.get_model_weights(name).DEFAULT.get_state_dict(progress=False)
        import timm

        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as e:  # noqa: BLE001 — network, hub and cache failures all end the same way
        raise SpecError(f"could not fetch hub weights for {model_name!r} ({type(e).__name__}); offline? pass "
                        f"--weights PATH, or drop --pretrained to train from scratch") from None


def state_dict_sha256(state: Dict[str, torch.Tensor]) -> str:
    buffer = io.BytesIO()
    torch.save({k: state[k] for k in sorted(state)}, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def load_pretrained(model: nn.Module, model_name: str, source: str) -> str:
    """Load `source` into `model`; returns the SHA-256 of the weights used."""
    if source == "hub":
        state = hub_state_dict(model_name)
    else:
        file = Path(source)
        if not file.is_file():
            raise SpecError(f"pretrained weights {source!r} not found; pass an existing --weights file")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise SpecError(f"pretrained weights {source!r} could not be read ({type(e).__name__})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise SpecError(f"pretrained weights {source!r} share no tensor with model {model_name!r}")
    model.load_state_dict(usable, strict=False)
    return state_dict_sha256(state)
