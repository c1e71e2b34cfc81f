"""Sanity checks for pruning from a pretrained model (Frankle et al. 2021, "Pruning Neural Networks
at Initialization: Why Are We Missing the Mark?"; Liu et al. 2019, "Rethinking the Value of Network
Pruning"): does the result owe anything to *which* units the method kept, or to the pretrained
weights it kept them with?

- `shuffle`: the found masks permuted within each layer (channel group, unit set): every layer keeps
  its count, so the per-layer allocation is the method's, the positions are random.
- `reinit`: the found structure re-initialised (`reinitialise`) and trained from scratch; the
  harness gives it the steps the pruned model's weights had (dense pretrain + fine-tune).

A method that prunes from a pretrained model offers them as its `sanity` setting
(`methods.base.sanity_field`) and declares them among its signal controls.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, TypeVar, Union

import torch
from torch import nn

Masks = TypeVar("Masks", bound=Union[Sequence[torch.Tensor], Dict[str, torch.Tensor]])

# std of the draw for parameters no module re-initialises (timm's pos_embed is trunc_normal(0.02))
LOOSE_PARAMETER_STD = 0.02


def shuffle_within_layers(masks: Union[Sequence[torch.Tensor], Dict[str, torch.Tensor]],
                          generator: torch.Generator) -> Union[List[torch.Tensor], Dict[str, torch.Tensor]]:
    """Each boolean mask with its entries permuted at random (`generator`): the same number kept
    per tensor, at random positions. A list (per channel group) or a {name: mask} dict, as given."""
    def shuffled(mask: torch.Tensor) -> torch.Tensor:
        order = torch.randperm(mask.numel(), generator=generator).to(mask.device)
        return mask.flatten()[order].view_as(mask)

    if isinstance(masks, dict):
        return {name: shuffled(m) for name, m in masks.items()}
    return [shuffled(m) for m in masks]


@torch.no_grad()
def reinitialise(model: nn.Module, generator: Optional[torch.Generator] = None) -> Dict[str, int]:
    """Fresh weights for `model` in place, its structure kept, drawn the way the model family
    initialises itself (a re-initialised structure should start where a trained one did): every
    module's own `reset_parameters` first (norms to 1 and 0, BatchNorm's running statistics reset),
    and N(0, 0.02²) for parameters no module resets; then timm's `init_weights` for a timm
    VisionTransformer (truncated normal 0.02 for Linear, position embedding and class token as
    timm draws them), and for convolutions elsewhere torchvision's and this project's CNN scheme
    (Kaiming normal, fan-out, ReLU gain; biases 0). Returns the counts of each kind, for the record."""
    if generator is not None:
        torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator)))
    reset = set()
    modules = 0
    for module in model.modules():
        if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
            module.reset_parameters()
            modules += 1
            reset.update(id(p) for p in module.parameters(recurse=False))
    from timm.models.vision_transformer import VisionTransformer

    vits = [m for m in model.modules() if isinstance(m, VisionTransformer)]
    in_vit = {id(p) for v in vits for p in v.parameters()}
    convs = 0
    for m in model.modules():                   # drawn right after the resets: the same stream for one structure
        if isinstance(m, nn.Conv2d) and id(m.weight) not in in_vit:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            convs += 1
    loose = 0
    for p in model.parameters():
        if id(p) not in reset:
            p.normal_(0.0, LOOSE_PARAMETER_STD)
            loose += 1
    for vit in vits:
        vit.init_weights()
    return {"modules_reset": modules, "parameters_drawn": loose, "vit_init_weights": len(vits),
            "convs_kaiming_fan_out": convs}
