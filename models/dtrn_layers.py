"""DTRN's encoder blocks on *packed* tokens: the real positions of every behaviour sequence of the batch, in one list.

The TIM encodes all sequences together, for all K tasks at once: tokens are [G, N, d] with G = 1 before the first
conditional LayerNorm (the first attention does not depend on the task, so it runs once) and G = K after it; each
token carries its (task, type) pair's generated LayerNorm parameters as a [K, N, d] tensor. A *segment* is one
sequence of one row (segment ``s * B + row`` for sequence s), so pooling is one weighted segment sum for every task
and sequence.

Attention runs on a padded layout of the segments with at least two tokens (``scaled_dot_product_attention`` with a
key-padding mask). A one-token segment attends to itself alone, softmax weight exactly 1, so its output is its own
value vector; an empty segment has no tokens. No attention row is therefore fully masked, and the padded work
follows the number of real histories, not B x sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.mlp import MLP


def conditional_layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``gamma * norm(x) + beta`` with externally generated gamma/beta (broadcast against x's leading dims)."""
    return torch.addcmul(beta, F.layer_norm(x, x.shape[-1:], eps=eps), gamma)  # one pass instead of two


def scatter_tokens(tokens: torch.Tensor, index: torch.Tensor, slots: int, fill: float = 0.0) -> torch.Tensor:
    """Packed tokens [G, N, ...] -> padded [G, slots, ...] (``fill`` at padding); ``index`` [N] are their slots."""
    out = tokens.new_full((tokens.shape[0], slots, *tokens.shape[2:]), fill)
    return out.index_copy(1, index, tokens)


def bucket_widths(width: int) -> list[int]:
    """Padded widths of the attention buckets: powers of two from 2, capped at ``width``."""
    widths, w = [], 2
    while w < width:
        widths.append(w)
        w *= 2
    return [*widths, width]


@dataclass
class Packed:
    """Where the packed tokens of several [B, L_s] masks sit.

    source: [N] each token's index in its own sequence's flattened [B * L_s] layout (sequences one after another);
    counts: tokens per sequence; segment: [N] ``s * B + row``; position: [N] its position in the row (for position
    embeddings); lengths: [S * B] tokens per segment; slot: [N] ``segment * width + rank`` in a padded
    [S * B, width] layout (rank = order among the segment's tokens: left-aligned whatever the mask).

    Attention layout: the segments with >= 2 tokens, bucketed by length into padded blocks ``buckets`` (rows,
    width) laid end to end (attention cost follows each history's length, not the longest); ``gather`` [slots]: the
    token at each slot (token 0 at padding: any finite value will do, the key is masked and the query row unread);
    ``masks``: each block's key-padding mask [rows, width]; ``scatter`` [N]: each token's slot in the blocks'
    output followed by the N tokens themselves (a one-token segment reads its own value).
    """

    source: torch.Tensor
    counts: list[int]
    segment: torch.Tensor
    position: torch.Tensor
    lengths: torch.Tensor
    width: int
    slot: torch.Tensor
    buckets: list[tuple[int, int]]
    gather: torch.Tensor
    masks: list[torch.Tensor]
    scatter: torch.Tensor

    @property
    def num_segments(self) -> int:
        return self.lengths.shape[0]

    @staticmethod
    def of(masks: list[torch.Tensor]) -> Packed:
        sources, segments, positions, ranks, counts = [], [], [], [], []
        for s, mask in enumerate(masks):
            b, length = mask.shape
            flat = mask.reshape(-1).nonzero().squeeze(1)
            row = torch.div(flat, length, rounding_mode="floor")
            sources.append(flat)
            segments.append(row + s * b)
            positions.append(flat - row * length)
            ranks.append((mask.cumsum(dim=1) - 1).reshape(-1).index_select(0, flat))
            counts.append(flat.shape[0])
        segment, rank = torch.cat(segments), torch.cat(ranks)
        lengths = torch.cat([m.sum(dim=1) for m in masks])
        # The widest mask bounds every segment (no host sync for the batch's longest history).
        width = max(m.shape[1] for m in masks)
        device = lengths.device
        n = segment.shape[0]

        # Attended segments (>= 2 tokens) in blocks by length: block i holds the lengths in (widths[i-1], widths[i]].
        # Block sizes come from nonzero (the one data-dependent op here), never from a host read of a tensor.
        several = (lengths >= 2).nonzero().squeeze(1)
        seg_lengths = lengths.index_select(0, several)
        widths = bucket_widths(width)
        bucket = torch.zeros_like(seg_lengths)
        for w in widths[:-1]:
            bucket = bucket + (seg_lengths > w).long()
        first = torch.zeros_like(several)  # each attended segment's first slot
        blocks, block_masks, slots = [], [], 0
        for i, w in enumerate(widths):
            members = (bucket == i).nonzero().squeeze(1)
            rows = members.shape[0]
            if not rows:
                continue
            first = first.index_copy(0, members, slots + torch.arange(rows, device=device) * w)
            lengths_i = seg_lengths.index_select(0, members)
            block_masks.append(torch.arange(w, device=device)[None, :] < lengths_i[:, None])
            blocks.append((rows, w))
            slots += rows * w
        seg_first = torch.full_like(lengths, -1).index_copy(0, several, first)
        token_first = seg_first.index_select(0, segment)
        attended = (token_first >= 0).nonzero().squeeze(1)
        token_slot = token_first + rank
        gather = torch.zeros(slots, dtype=torch.long, device=device)
        gather = gather.index_copy(0, token_slot.index_select(0, attended), attended)
        scatter = torch.where(token_first >= 0, token_slot, slots + torch.arange(n, device=device))
        return Packed(
            source=torch.cat(sources),
            counts=counts,
            segment=segment,
            position=torch.cat(positions),
            lengths=lengths,
            width=width,
            slot=segment * width + rank,
            buckets=blocks,
            gather=gather,
            masks=block_masks,
            scatter=scatter,
        )


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
    """Multi-head self-attention within each segment of packed tokens [G, N, d] (see the module docstring)."""

    def __init__(self, d_model: int, num_heads: int, device: torch.device | None = None) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"dtrn.d_model ({d_model}) must be divisible by dtrn.num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, device=device)
        self.proj = nn.Linear(d_model, d_model, device=device)

    def forward(self, tokens: torch.Tensor, packed: Packed) -> torch.Tensor:
        g, _, d = tokens.shape
        heads = self.num_heads
        dh = d // heads
        qkv = self.qkv(tokens)  # [G, N, 3d], position-wise: padding costs nothing here
        outs = []
        if packed.buckets:
            # Whole [3d] rows gathered into the padded blocks (a contiguous row copy per slot); the kernel reads q, k
            # and v through strided views.
            padded = qkv.index_select(1, packed.gather).split([r * w for r, w in packed.buckets], dim=1)
            for (rows, width), block, mask in zip(packed.buckets, padded, packed.masks, strict=True):
                qkv_b = block.view(g, rows, width, 3, heads, dh).permute(3, 0, 4, 1, 2, 5)  # [3, G, heads, R, W, dh]
                # Batch = (G, head), "heads" = the block's rows: the mask [rows, width] broadcasts over G and heads.
                q, k, v = (x.reshape(g * heads, rows, width, dh) for x in qkv_b.unbind(0))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, :, None, :])
                outs.append(out.view(g, heads, rows, width, dh).permute(0, 2, 3, 1, 4).reshape(g, rows * width, d))
        out = torch.cat([*outs, qkv[..., 2 * d :]], dim=1).index_select(1, packed.scatter)  # [G, N, d]
        return self.proj(out)


class EncoderLayer(nn.Module):
    """Post-LN Transformer layer whose two LayerNorms are conditional: parameters come from the hypernetwork."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float, device: torch.device | None) -> None:
        super().__init__()
        self.attention = SelfAttention(d_model, num_heads, device)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_dim, device=device), nn.ReLU(), nn.Linear(ffn_dim, d_model, device=device)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, tokens: torch.Tensor, packed: Packed, gamma: list[torch.Tensor], beta: list[torch.Tensor]
    ) -> torch.Tensor:
        """tokens [G, N, d] with G = 1 (not yet conditioned) or K; gamma, beta: the layer's two LayerNorms, each
        [K, N, d] (every token's (task, type) pair's). Returns [K, N, d]."""
        attn = self.attention(tokens, packed)
        x = conditional_layer_norm(tokens + self.dropout(attn), gamma[0], beta[0])
        return conditional_layer_norm(x + self.dropout(self.ffn(x)), gamma[1], beta[1])


class TargetAttention(nn.Module):
    """DIN-style pooling: weight each position by ``MLP([h, q, h - q, h * q])`` with the candidate item q,
    softmax over the segment's real positions (our reading; DIN itself does not normalise), weighted sum.

    The first scorer layer is an ordinary ``nn.Linear(4d, H)``; it is applied in its expanded form
    ``[W_h + W_d, W_p] [h, h * q] + (W_q - W_d) q + b``, which is exactly the same function with a [.., 2d] input
    instead of [.., 4d], and the q term is computed once per segment instead of once per position.
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

    def weights(self, tokens: torch.Tensor, packed: Packed, query: torch.Tensor) -> torch.Tensor:
        """tokens [K, N, d], query [S * B, d] (each segment's candidate) -> softmax weights [K, N] per segment."""
        k, _, d = tokens.shape
        q = self.query_norm(query)
        w_h, w_q, w_diff, w_prod = self.first.weight.split(d, dim=1)
        q_term = F.linear(q, w_q - w_diff, self.first.bias).index_select(0, packed.segment)  # [N, H]
        q_tok = q.index_select(0, packed.segment)
        # The h and h * q terms as one product over [h, h * q]: one wider matmul instead of two and an add.
        pre = F.linear(torch.cat([tokens, tokens * q_tok], dim=-1), torch.cat([w_h + w_diff, w_prod], dim=1)) + q_term
        scores = self.rest(pre).squeeze(-1)  # [K, N]
        # Softmax within each segment on the padded layout, padding at the dtype's minimum (a segment without tokens
        # then gets uniform weights over padding, which no token reads: no NaN).
        slots = packed.num_segments * packed.width
        padded = scatter_tokens(scores, packed.slot, slots, torch.finfo(scores.dtype).min)
        weights = torch.softmax(padded.view(k, packed.num_segments, packed.width), dim=-1)
        return weights.view(k, slots).index_select(1, packed.slot)
