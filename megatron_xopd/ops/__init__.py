"""Vocab-parallel (tensor-parallel) log-probs and student/teacher divergences, chunked over tokens."""

from megatron_xopd.ops.divergence import fused_linear_divergence, vocab_parallel_divergence
from megatron_xopd.ops.kernels import KINDS
from megatron_xopd.ops.logprobs import vocab_parallel_logprobs
from megatron_xopd.ops.topk import vocab_parallel_topk_divergence

__all__ = [
    "KINDS",
    "fused_linear_divergence",
    "vocab_parallel_divergence",
    "vocab_parallel_logprobs",
    "vocab_parallel_topk_divergence",
]
