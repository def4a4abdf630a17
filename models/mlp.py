"""Small dense building blocks."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear -> ReLU (-> Dropout) stacks. ``out_dim`` is the last hidden size (or ``in_dim`` with no layers)."""

    def __init__(
        self, in_dim: int, hidden: list[int], dropout: float = 0.0, device: torch.device | None = None
    ) -> None:
        layers: list[nn.Module] = []
        dim = in_dim
        for h in hidden:
            layers.append(nn.Linear(dim, h, device=device))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            dim = h
        super().__init__(*layers)
        self.out_dim = dim


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the sequence axis of [B, L, D] where mask [B, L] is True; zeros for empty sequences."""
    weights = mask.to(values.dtype).unsqueeze(-1)
    total = (values * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp_min(1.0)
    return total / count
