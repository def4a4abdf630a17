"""What the embedding lookups hand the bottoms: plain tensors, whichever module looked them up (TorchRec's
collections in training, ``torch.nn`` tables in serving)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseOutput:
    """Looked-up embeddings.

    fields: single-valued feature name -> [B, D]
    sequences: sequence feature name -> ([B, L, D] padded, [B, L] bool mask, True at real positions)
    """

    fields: dict[str, torch.Tensor]
    sequences: dict[str, tuple[torch.Tensor, torch.Tensor]]
