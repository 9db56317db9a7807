"""On-policy rollouts: TP/PP generation with a KV cache on the live student (text or speech prompts), and the
collection of a step's rollouts from a batch of paired prompts."""

from ..ops.sampling import SamplingParams
from .collect import Collected, RolloutCollector, StudentPrompts, has_speech, speech_inputs, teacher_prompts
from .engine import RolloutBatch, RolloutEngine, rollout_mode

__all__ = [
    "Collected",
    "RolloutBatch",
    "RolloutCollector",
    "RolloutEngine",
    "SamplingParams",
    "StudentPrompts",
    "rollout_mode",
    "has_speech",
    "speech_inputs",
    "teacher_prompts",
]
