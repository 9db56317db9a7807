"""Attention of the local (non-Transformer-Engine) layer spec, made fit for CPU rollouts.

megatron-core's ``DotProductAttention`` materialises the full score matrix and, for grouped-query attention,
first copies every key/value head ``num_heads / num_query_groups`` times (``repeat_interleave``): at decode time
that is a copy of the whole KV cache per layer and step, which made CPU rollouts ~0.6x the speed of
``transformers``. Outside training, on the two shapes inference produces (a causal prefill with as many queries
as keys, or single-query decode steps over the cache) and without an explicit mask, this class calls
``torch.nn.functional.scaled_dot_product_attention`` with ``enable_gqa``; everything else (training, masks,
chunked prefills) runs megatron's own code unchanged. The Transformer Engine spec (GPU) is not affected.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention


class InferenceSDPAttention(DotProductAttention):
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
        fast = (
            not self.training
            and attention_mask is None
            and attention_bias is None
            and packed_seq_params is None
            and (sq == 1 or sq == sk)
        )
        if not fast:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=sq > 1, scale=self.softmax_scale, enable_gqa=k.shape[1] != heads
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * head_dim)


class RotateOnceSelfAttention(SelfAttention):
    """``SelfAttention`` that stores keys in the static KV cache already rotated by RoPE.

    megatron-core's static-batching path caches un-rotated keys and re-rotates the whole cached prefix at every
    decode step (``_adjust_key_value_for_inference`` returns the full key positional embedding). Rotating each key
    once, before it enters the cache, gives the same attention inputs with O(1) instead of O(length) RoPE work
    per step. Only static batching with RoPE is changed; any other case runs megatron's code.
    """

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        if (
            inference_context is None
            or not inference_context.is_static_batching()
            or rotary_pos_emb is None
            or self.config.flash_decode
        ):
            return super()._adjust_key_value_for_inference(inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        q_pos, k_pos = rotary_pos_emb
        start = inference_context.sequence_len_offset
        end = start + key.size(0)
        key = apply_rotary_pos_emb(key, k_pos[start:end], config=self.config, cp_group=self.pg_collection.cp)
        query, key, value, _, mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, None, *args, **kwargs
        )
        return query, key, value, (q_pos[start:end], None), mask_type, block_table
