"""DTRN (Liu et al., CIKM 2023): task-specific bottom representations at a small parameter cost.

Our reading of the method (``/work/shared/reference/methods.md`` section 2); the choices are switches in
``DTRNConfig``.

**TIM** (task-specific interest module). One Transformer encoder is shared by every (task k, behaviour type m) pair.
A hypernetwork maps (task embedding t_k, type embedding b_m) to the gamma and beta of every LayerNorm of that encoder,
``CLN_km(x) = gamma_km * norm(x) + beta_km``; attention and FFN weights are shared. Each behaviour sequence is
encoded once per task with its type's generated LayerNorms and pooled into the interest vector u_km, by DIN-style
target attention with the candidate item (default) or by a masked mean or sum (a sequence's own ``pooling`` in
the feature spec overrides ``dtrn.pooling``).

**TRM** (task-specific representation refinement). For task k the fields E = [user, item, context fields, dense,
u_k1 .. u_kM] are reweighted SENet-style: ``z_i = mean(e_i)``, ``a_k = act(W2_k relu(W1_k z))``, ``e_i^k = a_k,i e_i``;
``h_k`` is the concatenation. Task k's top input is h_k.

Padding is masked everywhere: the encoder works on *packed* tokens (the batch's real positions only, every sequence
in one list, ``models/dtrn_layers.py``), so padding never enters the position-wise layers or the pooling, and
attention sees it only as masked keys; a user with an empty sequence gets a zero interest vector. Packing also makes
the encoder's cost follow the real history lengths rather than ``max_length``. The K task-conditioned encodings are
one batched computation: tokens carry a leading task axis and each token its (task, type) pair's generated LayerNorm
parameters, so there is no loop over tasks or sequences. The first attention layer is task-independent (no
LayerNorm has been applied yet), so it runs once, not once per task.

Meta device: every parameter lives in a standard layer (``nn.Linear``, ``nn.LayerNorm``) or in a module with its own
``reset_parameters`` that (re)initialises everything beneath it. TorchRec's DMP materialises a meta model by calling
``reset_parameters`` only on modules that hold a parameter *directly*, children first: the custom inits below are on
such modules (``HyperNetwork``, ``PositionEmbedding``), so they run after their children's defaults. (That is also why
there is no ``nn.MultiheadAttention`` here: its init is ``_reset_parameters`` and DMP would leave it uninitialised.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from features.spec import FeatureSpec
from models.config import DTRNConfig
from models.dtrn_layers import EncoderLayer, Packed, PositionEmbedding, TargetAttention
from models.sparse_output import SparseOutput


class HyperNetwork(nn.Module):
    """(task k, behaviour type m) -> gamma and beta of each of ``num_norms`` LayerNorms of width ``d_model``.

    ``forward()`` returns gamma, beta of shape [K, M, num_norms, d_model] for every pair at once (independent of the
    batch, so it costs one tiny MLP per step). gamma = 1 + delta: with the output layer initialised at a small std the
    encoder starts close to one with ordinary LayerNorms, and the pairs still differ from the first step.
    """

    def __init__(
        self,
        num_tasks: int,
        num_types: int,
        num_norms: int,
        d_model: int,
        task_emb_dim: int,
        type_emb_dim: int,
        hidden: int,
        init_std: float,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.num_norms, self.d_model, self.init_std = num_norms, d_model, init_std
        self.task_emb = nn.Parameter(torch.empty(num_tasks, task_emb_dim, device=device))
        self.type_emb = nn.Parameter(torch.empty(num_types, type_emb_dim, device=device))
        self.hidden = nn.Linear(task_emb_dim + type_emb_dim, hidden, device=device)
        self.out = nn.Linear(hidden, 2 * num_norms * d_model, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.task_emb)
        nn.init.normal_(self.type_emb)
        self.hidden.reset_parameters()
        # With N(0, 1) embeddings and the default Linear init, E[relu(hidden)^2] is about 1/6: scale the output
        # weights so that each generated delta has a std of about init_std.
        nn.init.normal_(self.out.weight, std=self.init_std * math.sqrt(6.0 / self.out.in_features))
        nn.init.zeros_(self.out.bias)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, m = self.task_emb.shape[0], self.type_emb.shape[0]
        pairs = torch.cat(
            [
                self.task_emb.unsqueeze(1).expand(k, m, -1),
                self.type_emb.unsqueeze(0).expand(k, m, -1),
            ],
            dim=-1,
        )
        out = self.out(F.relu(self.hidden(pairs))).view(k, m, 2, self.num_norms, self.d_model)
        return 1.0 + out[:, :, 0], out[:, :, 1]


class TIM(nn.Module):
    """Task-specific interest module: every behaviour sequence encoded once per task by the shared encoder with that
    (task, type) pair's generated LayerNorms, then pooled into an interest vector."""

    def __init__(
        self,
        num_tasks: int,
        behaviour_types: list[str],
        seq_dim: int,
        max_length: int,
        cfg: DTRNConfig,
        dropout: float = 0.0,
        device: torch.device | None = None,
        poolings: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        poolings = poolings if poolings is not None else [cfg.pooling] * len(behaviour_types)
        self.types = list(behaviour_types)
        self.num_tasks = num_tasks
        self.d_model = cfg.d_model or seq_dim
        d = self.d_model
        # The candidate item and the sequences share a table; one projection maps both (none when widths agree).
        self.input_proj = nn.Linear(seq_dim, d, device=device) if d != seq_dim else None
        self.position = PositionEmbedding(max_length, d, device) if cfg.positional else None
        self.layers = nn.ModuleList(
            [EncoderLayer(d, cfg.num_heads, cfg.ffn_dim, dropout, device) for _ in range(cfg.num_layers)]
        )
        self.num_norms = 2 * cfg.num_layers
        self.hyper = HyperNetwork(
            num_tasks,
            len(self.types),
            self.num_norms,
            d,
            cfg.task_emb_dim,
            cfg.type_emb_dim,
            cfg.hyper_hidden,
            cfg.hyper_init_std,
            device,
        )
        self.pool = TargetAttention(d, cfg.attention_mlp, device) if "target_attention" in poolings else None
        self.poolings = list(poolings)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_proj is None else self.input_proj(x)

    def forward(
        self,
        sequences: list[tuple[torch.Tensor, torch.Tensor]],
        types: list[int],
        queries: list[torch.Tensor | None],
    ) -> torch.Tensor:
        """sequences: ([B, L, d_in], mask [B, L]) each; types: index into ``behaviour_types`` each; queries: the
        candidate item [B, d_in] for each sequence pooled by target attention (None for the others). Returns
        interests [K, M, B, d]."""
        gamma, beta = self.hyper()  # [K, T, num_norms, d]
        packed = Packed.of([mask for _, mask in sequences])
        b = sequences[0][1].shape[0]
        d = self.d_model
        raw = torch.cat(
            [
                seq.reshape(-1, seq.shape[-1]).index_select(0, src)
                for (seq, _), src in zip(sequences, packed.source.split(packed.counts), strict=True)
            ]
        )
        x = self.project(raw)
        if self.position is not None:
            x = x + self.position(packed.width).index_select(0, packed.position)

        # Each token's (task, type) LayerNorm parameters, [K, N, d] per LayerNorm. Tokens come sequence by sequence,
        # so these are each sequence's pair broadcast over its tokens: the backward is a sum per block rather than
        # an index_add over every token.
        def per_token(p: torch.Tensor, j: int) -> torch.Tensor:
            blocks = [p[:, t, j, None, :].expand(-1, n, -1) for t, n in zip(types, packed.counts, strict=True)]
            return torch.cat(blocks, dim=1)

        gammas = [per_token(gamma, j) for j in range(self.num_norms)]
        betas = [per_token(beta, j) for j in range(self.num_norms)]
        tokens = x.unsqueeze(0)  # [1, N, d]: the first attention is task-independent, so it runs once, not K times
        for i, layer in enumerate(self.layers):
            tokens = layer(tokens, packed, gammas[2 * i : 2 * i + 2], betas[2 * i : 2 * i + 2])
        weights = self.pooling_weights(tokens, packed, queries, b)
        pooled = tokens.new_zeros(self.num_tasks, packed.num_segments, d)
        pooled = pooled.index_add(1, packed.segment, weights.unsqueeze(-1) * tokens)
        return pooled.view(self.num_tasks, len(sequences), b, d)

    def pooling_weights(
        self, tokens: torch.Tensor, packed: Packed, queries: list[torch.Tensor | None], b: int
    ) -> torch.Tensor:
        """Each token's weight in its segment's pooled vector: target-attention softmax, 1 / length (mean) or 1
        (sum). [K, N] or, without target attention, [N]."""
        attended = None
        if self.pool is not None:
            # Sequences pooled otherwise get a zero query: their scores are computed, finite, and never used.
            query = torch.cat(
                [self.project(q) if q is not None else tokens.new_zeros(b, self.d_model) for q in queries]
            )
            attended = self.pool.weights(tokens, packed, query)
            if all(p == "target_attention" for p in self.poolings):
                return attended
        per_segment = [
            1.0 / packed.lengths[s * b : (s + 1) * b].clamp_min(1).to(tokens.dtype)
            if p == "mean"
            else tokens.new_ones(b)
            for s, p in enumerate(self.poolings)
        ]
        fixed = torch.cat(per_segment).index_select(0, packed.segment)
        if attended is None:
            return fixed
        is_attended = torch.cat(
            [
                torch.full((n,), p == "target_attention", device=tokens.device)
                for n, p in zip(packed.counts, self.poolings, strict=True)
            ]
        )
        return torch.where(is_attended, attended, fixed)


class TRM(nn.Module):
    """Task-specific representation refinement: per task, SENet excitation over field embeddings."""

    def __init__(
        self,
        num_tasks: int,
        num_fields: int,
        hidden: int,
        activation: str,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.excite = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Linear(num_fields, hidden, device=device),
                    nn.ReLU(),
                    nn.Linear(hidden, num_fields, device=device),
                )
                for _ in range(num_tasks)
            ]
        )
        self.scale = 2.0 if activation == "two_sigmoid" else 1.0

    def weights(self, task: int, fields: list[torch.Tensor]) -> torch.Tensor:
        """a_k [B, F] for task k's fields (each [B, d_i])."""
        z = torch.stack([f.mean(dim=-1) for f in fields], dim=1)
        return self.scale * torch.sigmoid(self.excite[task](z))

    def forward(self, task: int, fields: list[torch.Tensor]) -> torch.Tensor:
        a = self.weights(task, fields)
        return torch.cat([a[:, i : i + 1] * f for i, f in enumerate(fields)], dim=1)

    def weights_all(self, z: torch.Tensor) -> torch.Tensor:
        """Every task's excitation at once: z [K, B, F] (task k's squeezed fields) -> a [K, B, F]."""
        first = [cast(nn.Linear, cast(nn.Sequential, e)[0]) for e in self.excite]
        last = [cast(nn.Linear, cast(nn.Sequential, e)[2]) for e in self.excite]
        w1, b1 = torch.stack([m.weight for m in first]), torch.stack([m.bias for m in first])
        w2, b2 = torch.stack([m.weight for m in last]), torch.stack([m.bias for m in last])
        hidden = torch.relu(torch.baddbmm(b1.unsqueeze(1), z, w1.transpose(1, 2)))
        return self.scale * torch.sigmoid(torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2)))


def candidate_field(spec: FeatureSpec, table: str) -> str | None:
    """The single-valued feature that is the candidate for sequences of ``table`` (role item first)."""
    on_table = [f for f in spec.sparse if f.table == table]
    on_table.sort(key=lambda f: f.role != "item")
    return on_table[0].name if on_table else None


class DTRNBottom(nn.Module):
    """Per-task bottoms: TIM interest vectors, then TRM reweighting of [fields, dense, interests] into h_k."""

    def __init__(
        self,
        spec: FeatureSpec,
        field_dims: dict[str, int],
        seq_dim: int,
        cfg: DTRNConfig,
        dropout: float = 0.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if not spec.sequences:
            raise ValueError("bottom: dtrn needs behaviour sequences in the feature spec")
        self.num_tasks = len(spec.tasks)
        self.fields = [f.name for f in spec.sparse]
        self.sequences = [f.name for f in spec.sequences]
        behaviours = spec.behaviours
        self.types = [behaviours.index(f.behaviour) for f in spec.sequences]
        # A sequence's own `pooling` in the feature spec wins over dtrn.pooling, as in the plain bottom: a bag of
        # the candidate's genres has no candidate to attend with and says `pooling: mean`.
        self.poolings = [f.pooling or cfg.pooling for f in spec.sequences]
        self.candidates = [
            candidate_field(spec, f.table) if p == "target_attention" else None
            for f, p in zip(spec.sequences, self.poolings, strict=True)
        ]
        missing = [
            s
            for s, p, c in zip(self.sequences, self.poolings, self.candidates, strict=True)
            if p == "target_attention" and c is None
        ]
        if missing:
            raise ValueError(
                f"bottom: dtrn pools {missing} by target attention, which needs a single-valued feature on the "
                "sequence's table (the candidate item); set `pooling: mean` on the sequence in the feature spec, or "
                "dtrn.pooling: mean"
            )
        self.tim = TIM(
            self.num_tasks,
            behaviours,
            seq_dim,
            max(f.max_length for f in spec.sequences),
            cfg,
            dropout,
            device,
            self.poolings,
        )
        self.dense_field = cfg.trm_dense_field and spec.dense_width > 0
        num_fields = len(self.fields) + int(self.dense_field) + len(self.sequences)
        self.trm = TRM(self.num_tasks, num_fields, cfg.trm_hidden, cfg.trm_activation, device)
        self.out_dim = sum(field_dims.values()) + spec.dense_width + len(self.sequences) * self.tim.d_model

    def interests(self, out: SparseOutput) -> torch.Tensor:
        """u [K, M, B, d]."""
        queries = [out.fields[c] if c is not None else None for c in self.candidates]
        return self.tim([out.sequences[s] for s in self.sequences], self.types, queries)

    def task_fields(
        self, out: SparseOutput, dense: torch.Tensor, interests: torch.Tensor, task: int
    ) -> list[torch.Tensor]:
        """E for task k: [user, item, context fields, (dense), u_k1 .. u_kM], each [B, d_i]."""
        fields = [out.fields[f] for f in self.fields]
        if self.dense_field:
            fields.append(dense)
        return fields + list(interests[task].unbind(0))

    def forward(self, out: SparseOutput, dense: torch.Tensor) -> list[torch.Tensor]:
        """h_k for every task: ``trm(k, task_fields(..., k))`` computed for all tasks in one batched pass (the
        fields shared by the tasks are squeezed and concatenated once)."""
        u = self.interests(out)  # [K, M, B, d]
        k, m, b, d = u.shape
        shared = [out.fields[f] for f in self.fields] + ([dense] if self.dense_field else [])
        z_shared = torch.stack([f.mean(dim=-1) for f in shared], dim=1)  # [B, F - M]
        z = torch.cat([z_shared.expand(k, -1, -1), u.mean(dim=-1).transpose(1, 2)], dim=2)  # [K, B, F]
        a = self.trm.weights_all(z)
        e = torch.cat([torch.cat(shared, dim=1).expand(k, -1, -1), u.permute(0, 2, 1, 3).reshape(k, b, m * d)], dim=2)
        # a_k,i repeated over field i's columns, as a product with the 0/1 [F, D] expansion (exact; a gather's
        # backward would be a scatter-add).
        expand = torch.block_diag(*[a.new_ones(1, f.shape[1]) for f in shared], *[a.new_ones(1, d)] * m)  # [F, D]
        h = torch.matmul(a, expand) * e
        if not self.dense_field:
            h = torch.cat([h, dense.expand(k, -1, -1)], dim=2)
        return list(h.unbind(0))
