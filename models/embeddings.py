"""TorchRec embedding tables built from the feature spec.

Tables read by a behaviour sequence go into an ``EmbeddingCollection`` (unpooled: every position keeps its vector, so
sequence models can attend over them); the rest go into an ``EmbeddingBagCollection``. Both take the same
``KeyedJaggedTensor``; each looks up only its own keys. Under ``DistributedModelParallel`` the planner shards both.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from features.spec import FeatureSpec, SequenceFeature, SparseFeature
from models.sparse_output import SparseOutput

__all__ = ["SparseArch", "SparseOutput"]


class SparseArch(nn.Module):
    """Embedding lookups for every id feature of the spec."""

    def __init__(self, spec: FeatureSpec, device: torch.device | None = None) -> None:
        super().__init__()
        self._seq_lengths = {f.name: f.max_length for f in spec.sequences}
        seq_table_names = {t.name for t in spec.sequence_tables}
        self._unpooled_fields = [f.name for f in spec.sparse if f.table in seq_table_names]
        self._pooled_fields = [f.name for f in spec.sparse if f.table not in seq_table_names]
        features_of: dict[str, list[str]] = {}
        id_features: list[SparseFeature | SequenceFeature] = [*spec.sparse, *spec.sequences]
        for f in id_features:
            features_of.setdefault(f.table, []).append(f.name)
        self.ec: EmbeddingCollection | None = None
        self.ebc: EmbeddingBagCollection | None = None
        if spec.sequence_tables:
            self.ec = EmbeddingCollection(
                tables=[
                    EmbeddingConfig(
                        name=t.name,
                        embedding_dim=t.dim,
                        num_embeddings=t.num_buckets,
                        feature_names=features_of[t.name],
                    )
                    for t in spec.sequence_tables
                ],
                device=device,
            )
        if spec.pooled_tables:
            self.ebc = EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(
                        name=t.name,
                        embedding_dim=t.dim,
                        num_embeddings=t.num_buckets,
                        feature_names=features_of[t.name],
                        # Single-valued ids: a bag of one row is the row either way; multi-valued ones average.
                        pooling=PoolingType.MEAN if t.name in spec.mean_pooled_tables else PoolingType.SUM,
                    )
                    for t in spec.pooled_tables
                ],
                device=device,
            )
        self.field_dims = {f.name: spec.table(f.table).dim for f in spec.sparse}
        self.sequence_dim = spec.sequence_tables[0].dim if spec.sequence_tables else 0

    def forward(self, features: KeyedJaggedTensor) -> SparseOutput:
        fields: dict[str, torch.Tensor] = {}
        sequences: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.ebc is not None:
            pooled = self.ebc(features).to_dict()
            for name in self._pooled_fields:
                fields[name] = pooled[name]
        if self.ec is not None:
            unpooled = self.ec(features)
            for name in self._unpooled_fields:
                # Every row has exactly one id, so the jagged values are already [B, D].
                fields[name] = unpooled[name].values()
            for name, max_len in self._seq_lengths.items():
                jt = unpooled[name]
                padded = jt.to_padded_dense(desired_length=max_len, padding_value=0.0)
                lengths = jt.lengths()
                positions = torch.arange(max_len, device=lengths.device)
                sequences[name] = (padded, positions.unsqueeze(0) < lengths.unsqueeze(1))
        return SparseOutput(fields=fields, sequences=sequences)
