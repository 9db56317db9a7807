"""On-policy rollouts: TP/PP generation with a KV cache on the live student (text or speech prompts)."""

from .engine import RolloutBatch, RolloutEngine, rollout_mode
from .sampling import SampleOutput, SamplingParams, row_keys, sample_vocab_parallel

__all__ = [
    "RolloutBatch",
    "RolloutEngine",
    "SampleOutput",
    "SamplingParams",
    "rollout_mode",
    "row_keys",
    "sample_vocab_parallel",
]
