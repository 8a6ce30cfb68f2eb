"""Param groups for the common recipe: no weight decay on biases and normalization weights."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["param_groups_no_decay"]


def param_groups_no_decay(model: nn.Module, Lambda: float = 0.01, **group_options: Any) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into two groups: weights of 2 or more dims decay with
    ``Lambda``; 0-D and 1-D parameters (biases, LayerNorm/BatchNorm/RMSNorm scales and shifts) get
    ``Lambda=0``. Extra keyword options are set on both groups. Empty groups are left out.

    >>> model = nn.Linear(4, 3)
    >>> [len(g["params"]) for g in param_groups_no_decay(model)]
    [1, 1]
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "Lambda": Lambda, **group_options},
        {"params": no_decay, "Lambda": 0.0, **group_options},
    ]
    return [g for g in groups if g["params"]]
