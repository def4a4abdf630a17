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

Padding is masked everywhere: the encoder works on *packed* tokens (the batch's real positions only), so padding
never enters the position-wise layers or the pooling, and attention sees it only as masked keys; a user with an empty
sequence gets a zero interest vector (finite, no NaN from an all-masked softmax). Packing also makes the encoder's
cost follow the real history lengths rather than ``max_length``. The first attention layer is task-independent (no
LayerNorm has been applied yet), so it runs once per sequence, not once per task.

Meta device: every parameter lives in a standard layer (``nn.Linear``, ``nn.LayerNorm``) or in a module with its own
``reset_parameters`` that (re)initialises everything beneath it. TorchRec's DMP materialises a meta model by calling
``reset_parameters`` only on modules that hold a parameter *directly*, children first: the custom inits below are on
such modules (``HyperNetwork``, ``PositionEmbedding``), so they run after their children's defaults. (That is also why
there is no ``nn.MultiheadAttention`` here: its init is ``_reset_parameters`` and DMP would leave it uninitialised.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from features.spec import FeatureSpec
from models.config import DTRNConfig
from models.mlp import MLP
from models.sparse_output import SparseOutput


def conditional_layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``gamma * norm(x) + beta`` with externally generated gamma/beta (broadcast against x's leading dims)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * gamma + beta


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


class PositionEmbedding(nn.Module):
    """Learned position embeddings (position 0 = newest behaviour), small init so item identity dominates at first."""

    def __init__(self, max_length: int, dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_length, dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, length: int) -> torch.Tensor:
        """[length, dim]; positions past ``max_length`` can only be padding (sequences are truncated), so zeros."""
        if length <= self.weight.shape[0]:
            return self.weight[:length]
        return F.pad(self.weight, (0, 0, 0, length - self.weight.shape[0]))


class SelfAttention(nn.Module):
    """Multi-head self-attention over [N, L, d] with a key-padding mask [N, L] (True = real position).

    Rows without any real position attend to every position instead (an all-masked softmax is NaN); their outputs
    are garbage but finite, and the pooling drops them.
    """

    def __init__(self, d_model: int, num_heads: int, device: torch.device | None = None) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"dtrn.d_model ({d_model}) must be divisible by dtrn.num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, device=device)
        self.proj = nn.Linear(d_model, d_model, device=device)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        attend = mask | ~mask.any(dim=1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(n, length, d))


def scatter_tokens(tokens: torch.Tensor, index: torch.Tensor, slots: int, fill: float = 0.0) -> torch.Tensor:
    """Packed tokens [G, N, ...] -> padded [G, slots, ...] (``fill`` at padding); ``index`` [N] are their slots."""
    out = tokens.new_full((tokens.shape[0], slots, *tokens.shape[2:]), fill)
    return out.index_copy(1, index, tokens)


class EncoderLayer(nn.Module):
    """Post-LN Transformer layer whose two LayerNorms are conditional: parameters come from the hypernetwork.

    Works on *packed* tokens (only the real positions of the batch, row-major), so the position-wise work (FFN,
    LayerNorms) skips padding; attention scatters them back to the padded [B, L] layout with a key-padding mask.
    """

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float, device: torch.device | None) -> None:
        super().__init__()
        self.attention = SelfAttention(d_model, num_heads, device)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_dim, device=device), nn.ReLU(), nn.Linear(ffn_dim, d_model, device=device)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, tokens: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor
    ) -> torch.Tensor:
        """tokens [G, N, d] with G = 1 (not yet conditioned) or K; index [N]: each token's slot in the flattened
        [B * L] mask; gamma, beta [K, 2, d]. Returns [K, N, d]."""
        g, _, d = tokens.shape
        b, length = mask.shape
        padded = scatter_tokens(tokens, index, b * length).view(g * b, length, d)
        attn = self.attention(padded, mask.repeat(g, 1)).view(g, b * length, d).index_select(1, index)
        x = conditional_layer_norm(tokens + self.dropout(attn), gamma[:, None, 0], beta[:, None, 0])
        return conditional_layer_norm(x + self.dropout(self.ffn(x)), gamma[:, None, 1], beta[:, None, 1])


class TargetAttention(nn.Module):
    """DIN-style pooling: weight each position by ``MLP([h, q, h - q, h * q])`` with the candidate item q,
    softmax over the row's real positions (our reading; DIN itself does not normalise), weighted sum.

    The first scorer layer is an ordinary ``nn.Linear(4d, H)``; it is applied in its expanded form
    ``(W_h + W_d) h + (W_q - W_d) q + W_p (h * q) + b``, which is exactly the same function without building the
    [.., 4d] concatenation, and the q term is computed once per row instead of once per position.
    """

    def __init__(self, d_model: int, hidden: list[int], device: torch.device | None = None) -> None:
        super().__init__()
        # The encoder ends with a LayerNorm; normalising the query puts q on the same scale as the keys (raw TorchRec
        # rows start tiny: uniform +-1/sqrt(num_embeddings)).
        self.query_norm = nn.LayerNorm(d_model, device=device)
        self.first = nn.Linear(4 * d_model, hidden[0] if hidden else 1, device=device)
        self.rest: nn.Module = (
            nn.Sequential(nn.ReLU(), MLP(hidden[0], hidden[1:], 0.0, device), nn.Linear(hidden[-1], 1, device=device))
            if hidden
            else nn.Identity()
        )

    def forward(
        self, tokens: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, query: torch.Tensor, length: int
    ) -> torch.Tensor:
        """tokens [K, N, d] (packed), rows [N]: each token's row, index [N]: its slot in [B * length], query [B, d].
        Returns pooled [K, B, d]; rows without tokens pool to 0."""
        k, _, d = tokens.shape
        b = query.shape[0]
        q = self.query_norm(query)
        w_h, w_q, w_diff, w_prod = self.first.weight.split(d, dim=1)
        q_term = F.linear(q, w_q - w_diff, self.first.bias)[rows]  # [N, H]
        q_tok = q[rows]
        pre = F.linear(tokens, w_h + w_diff) + q_term + F.linear(tokens * q_tok, w_prod)
        scores = self.rest(pre).squeeze(-1)  # [K, N]
        # Softmax within each row: back to the padded layout, padding at the dtype's minimum (a row without tokens
        # then gets uniform weights over padding, which no token reads: no NaN).
        padded = scatter_tokens(scores, index, b * length, torch.finfo(scores.dtype).min).view(k, b, length)
        weights = torch.softmax(padded, dim=-1).view(k, b * length).index_select(1, index)
        return tokens.new_zeros(k, b, d).index_add(1, rows, weights.unsqueeze(-1) * tokens)


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

    def encode(
        self, seq: torch.Tensor, mask: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """seq [B, L, d_in], mask [B, L], gamma/beta [K, num_norms, d] -> (tokens [K, N, d] of the N real positions,
        row-major, and their slots [N] in the flattened [B * L] layout)."""
        b, length, _ = seq.shape
        index = mask.reshape(-1).nonzero().squeeze(1)
        x = self.project(seq)
        if self.position is not None:
            x = x + self.position(length)
        # [1, N, d]: the first attention is task-independent, so it runs once, not K times.
        tokens = x.reshape(b * length, -1).index_select(0, index).unsqueeze(0)
        for i, layer in enumerate(self.layers):
            tokens = layer(tokens, index, mask, gamma[:, 2 * i : 2 * i + 2], beta[:, 2 * i : 2 * i + 2])
        return tokens, index

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
        pooled = []
        for i, ((seq, mask), t, query) in enumerate(zip(sequences, types, queries, strict=True)):
            tokens, index = self.encode(seq, mask, gamma[:, t], beta[:, t])
            b, length = mask.shape
            rows = torch.div(index, length, rounding_mode="floor")
            if self.poolings[i] == "target_attention":
                assert query is not None and self.pool is not None
                pooled.append(self.pool(tokens, rows, index, self.project(query), length))
                continue
            total = tokens.new_zeros(tokens.shape[0], b, self.d_model).index_add(1, rows, tokens)
            if self.poolings[i] == "mean":
                total = total / mask.sum(dim=1).clamp_min(1).to(tokens.dtype)[None, :, None]
            pooled.append(total)
        return torch.stack(pooled, dim=1)


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
        u = self.interests(out)
        hs = []
        for k in range(self.num_tasks):
            h = self.trm(k, self.task_fields(out, dense, u, k))
            hs.append(h if self.dense_field else torch.cat([h, dense], dim=1))
        return hs
