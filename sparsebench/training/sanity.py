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
    """Fresh weights for `model` in place, its structure kept: every module's own
    `reset_parameters` (conv, linear, norms: PyTorch's default initialisations; BatchNorm's running
    statistics reset too), and N(0, 0.02²) for parameters no module resets (a ViT's position
    embedding and class token). Returns the counts of each kind, for the record."""
    if generator is not None:
        torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator)))
    reset = set()
    modules = 0
    for module in model.modules():
        if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
            module.reset_parameters()
            modules += 1
            reset.update(id(p) for p in module.parameters(recurse=False))
    loose = 0
    for p in model.parameters():
        if id(p) not in reset:
            p.normal_(0.0, LOOSE_PARAMETER_STD)
            loose += 1
    return {"modules_reset": modules, "parameters_drawn": loose}
