"""RMSNorm for megatron's local (torch) spec that works under sequence parallelism.

megatron-core's local spec builds its norms with ``WrappedTorchNorm``, which asserts "sequence parallel not
supported". The norm itself is the same under SP (it is per token); what SP changes is that each TP rank sees
only its slice of the sequence, so the weight's gradient is a partial sum. Marking the weight
``sequence_parallel=True``, as megatron's ``FusedLayerNorm`` and TE's norms do, makes megatron's
``finalize_model_grads`` all-reduce it over TP. Used for the layer norms, the QK norms and the final norm.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with megatron's norm constructor and the sequence-parallel gradient mark."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        if config.normalization != "RMSNorm":
            raise ValueError(f"models.norm.RMSNorm built for normalization={config.normalization!r}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("models.norm.RMSNorm: layernorm_zero_centered_gamma is not supported")
        super().__init__(normalized_shape=hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel
