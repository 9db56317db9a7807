"""Vocab-parallel (tensor-parallel) log-probs and student/teacher divergences, chunked over tokens."""

from .divergence import fused_linear_divergence, fused_linear_divergence_loss, vocab_parallel_divergence
from .kernels import KINDS
from .logprobs import fused_linear_logprobs, vocab_parallel_logprobs
from .topk import vocab_parallel_topk, vocab_parallel_topk_divergence

__all__ = [
    "KINDS",
    "fused_linear_divergence",
    "fused_linear_divergence_loss",
    "fused_linear_logprobs",
    "vocab_parallel_divergence",
    "vocab_parallel_logprobs",
    "vocab_parallel_topk",
    "vocab_parallel_topk_divergence",
]
