"""Attention of the local (non-Transformer-Engine) layer spec: PyTorch's SDPA for training and rollouts.

megatron-core's ``DotProductAttention`` materialises the full [b, heads, s_q, s_k] score matrix (and its softmax,
kept for the backward) and, for grouped-query attention, first copies every key/value head
``num_heads / num_query_groups`` times (``repeat_interleave``): in training at 4096 tokens that is gigabytes per
layer, at decode time a copy of the whole KV cache per layer and step (CPU rollouts ran at ~0.6x ``transformers``).
:class:`SDPAttention` calls ``torch.nn.functional.scaled_dot_product_attention`` with ``enable_gqa`` instead
(FlashAttention or the memory-efficient kernel on CUDA, which keep no score matrix; PyTorch's flash-style CPU kernel
or its math kernel on CPU), in
training and inference alike, wherever its semantics are megatron's: causal without a mask, or a boolean mask
(``True`` = masked, megatron's convention, causality included); TP and SP need nothing (each rank holds its heads,
the whole sequence). Megatron's own code still runs attention biases, packed sequences, sliding windows, softmax
offsets, query-key layer scaling and attention dropout in training (SDPA would draw other dropout masks than
megatron's RNG tracker). One difference: a query row whose mask hides every key gets zeros from SDPA, a uniform
mix of all values from megatron; no mask megatron_xopd builds has such a row. The Transformer Engine spec (GPU) is
not affected.

Left-padded rollouts (:class:`PaddedStaticContext`): a batch of prompts of different lengths is prefilled in one
forward with every prompt ending at the same cache slot, as ``transformers`` does with left padding, so the whole
batch decodes from the first step. Row ``b``'s token in slot ``s`` then sits at position ``s - pad[b]``:
:class:`RotateOnceSelfAttention` rotates each row's keys and queries at those positions, and the caller's boolean
attention mask (megatron's convention, ``True`` = masked) hides the padding slots from the attention.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import Attention, SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class PaddedStaticContext(StaticInferenceContext):
    """megatron's static KV cache ([max_seq, rows, groups, dim] per layer) with left-padded rows.

    ``row_pad[b]``: padding slots in front of cache row ``b``'s tokens (None: no row is padded, megatron's own
    positions 0..S-1). :meth:`keep_rows` drops rows from the cache (finished samples) so that no later forward
    computes them.
    """

    def __init__(self, max_batch_size: int, max_sequence_length: int) -> None:
        super().__init__(max_batch_size, max_sequence_length)
        self.row_pad: torch.Tensor | None = None  # [rows in the cache] int64; None when no row is padded
        # What every layer of a forward would compute alike from the rows' padding (positions, rotary tables at
        # those positions): made once per forward, keyed by (what, slot offset, width); emptied when rows change.
        self._per_forward: dict[tuple, Any] = {}

    def set_row_pad(self, pad: torch.Tensor | None) -> None:
        """Padding slots in front of each cache row (None or all zeros: none)."""
        self.row_pad = pad if pad is not None and bool(pad.any()) else None
        self._per_forward = {}

    def reset(self) -> None:
        super().reset()
        self._per_forward = {}

    def _once(self, what: Any, width: int, make: Any) -> Any:
        key = (what, self.sequence_len_offset, width)
        if key not in self._per_forward:
            if any(k[1:] != key[1:] for k in self._per_forward):  # a new forward: drop the last one's
                self._per_forward = {}
            self._per_forward[key] = make()
        return self._per_forward[key]

    def positions(self, width: int) -> torch.Tensor | None:
        """Per-row positions [width, rows] of the next ``width`` slots; None without padding."""
        if self.row_pad is None:
            return None

        def make() -> torch.Tensor:
            slots = torch.arange(self.sequence_len_offset, self.sequence_len_offset + width, device=self.row_pad.device)
            return (slots[:, None] - self.row_pad[None, :]).clamp_(min=0)

        return self._once("positions", width, make)

    def rotary_at_positions(self, table: torch.Tensor, width: int) -> torch.Tensor:
        """A rotary table [S_max, 1, 1, D] at each row's positions of the next ``width`` slots: [width, rows, 1, D]
        (the same for every layer of the forward, so gathered once; the table is kept to check its identity)."""
        kept, gathered = self._once(("rotary", id(table)), width, lambda: (table, table[:, 0][self.positions(width)]))
        if kept is not table:  # a different table under a reused id: never from the memo
            return table[:, 0][self.positions(width)]
        return gathered

    def padding_mask(self, width: int) -> torch.Tensor | None:
        """The attention mask [rows, 1, width, offset + width] of the next ``width`` slots (``True`` = masked):
        causal, and no query sees a padding slot but its own (a padding query must attend somewhere). None
        without padding (plain causal attention)."""
        if self.row_pad is None:
            return None
        start = self.sequence_len_offset
        keys = torch.arange(start + width, device=self.row_pad.device)
        queries = keys[start:, None]
        mask = (keys[None, None, :] < self.row_pad[:, None, None]) & (keys != queries)[None]
        return (mask | (keys > queries)[None])[:, None]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only cache rows ``rows`` (indices into the current rows), in that order."""
        for layer, (key, value) in self.key_value_memory_dict.items():
            self.key_value_memory_dict[layer] = (key[:, rows], value[:, rows])
        self.set_row_pad(None if self.row_pad is None else self.row_pad[rows])


def padded_rows_supported(model: torch.nn.Module) -> bool:
    """Whether every attention of ``model`` honours :class:`PaddedStaticContext` (the local spec's classes)."""
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    return bool(attention) and all(
        isinstance(m, RotateOnceSelfAttention) and isinstance(m.core_attention, SDPAttention)
        and not m.config.flash_decode
        for m in attention
    )


class SDPAttention(DotProductAttention):
    """megatron's ``DotProductAttention`` through PyTorch's SDPA wherever the result is the same (module note)."""

    def _sdpa_applies(self, sq: int, sk: int, attention_mask, attention_bias, packed_seq_params) -> bool:
        if attention_bias is not None or packed_seq_params is not None or self.softmax_offset is not None:
            return False
        if self.scale_mask_softmax.window_size is not None or self.scale_mask_softmax.scale is not None:
            return False  # a sliding window; query-key layer scaling (fp16)
        if self.training and self.attention_dropout.p > 0:
            return False
        if attention_mask is not None:
            return attention_mask.dtype == torch.bool
        # megatron builds the causal mask only for as many queries as keys (a single query sees every key)
        return sq == 1 or sq == sk or self.attn_mask_type != AttnMaskType.causal

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        sq, b, heads, head_dim = query.shape
        sk = key.shape[0]
        if not self._sdpa_applies(sq, sk, attention_mask, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        # A given mask holds the causality too (megatron's convention); SDPA's boolean mask is True where allowed.
        allowed = None if attention_mask is None else ~attention_mask
        causal = allowed is None and sq > 1 and self.attn_mask_type == AttnMaskType.causal
        gqa = k.shape[1] != heads
        if gqa and q.is_cuda and (allowed is not None or q.dtype == torch.float32):
            # CUDA's grouped-query SDPA is FlashAttention's (bf16/fp16, no mask); the memory-efficient kernel, which
            # takes masks and float32, gets the key/value heads expanded (small next to the scores it avoids)
            k, v = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (k, v))
            gqa = False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, is_causal=causal, scale=self.softmax_scale, enable_gqa=gqa,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * head_dim)


class RotateOnceSelfAttention(SelfAttention):
    """``SelfAttention`` that stores keys in the static KV cache already rotated by RoPE.

    megatron-core's static-batching path caches un-rotated keys and re-rotates the whole cached prefix at every
    decode step (``_adjust_key_value_for_inference`` returns the full key positional embedding). Rotating each key
    once, before it enters the cache, gives the same attention inputs with O(1) instead of O(length) RoPE work
    per step. With a :class:`PaddedStaticContext` holding padded rows, each row is rotated at its own positions.
    Only static batching with RoPE is changed; any other case runs megatron's code.
    """

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        positions = inference_context.positions(key.size(0)) if isinstance(inference_context, PaddedStaticContext) else None
        if (
            inference_context is None
            or not inference_context.is_static_batching()
            or rotary_pos_emb is None
            or self.config.flash_decode
        ):
            if positions is not None:
                raise RuntimeError("padded rollout rows need RoPE and no flash decoding (padded_rows_supported)")
            return super()._adjust_key_value_for_inference(inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        q_pos, k_pos = rotary_pos_emb
        start = inference_context.sequence_len_offset
        end = start + key.size(0)
        if positions is None:
            q_pos, k_pos = q_pos[start:end], k_pos[start:end]
        else:  # [S_max, 1, 1, D] tables -> [s, rows, 1, D] at each row's positions, gathered once per forward
            width = key.size(0)
            q_pos = inference_context.rotary_at_positions(q_pos, width)
            k_pos = q_pos if k_pos is rotary_pos_emb[0] else inference_context.rotary_at_positions(k_pos, width)
        key = apply_rotary_pos_emb(key, k_pos, config=self.config, cp_group=self.pg_collection.cp)
        query, key, value, _, mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, None, *args, **kwargs
        )
        return query, key, value, (q_pos, None), mask_type, block_table
