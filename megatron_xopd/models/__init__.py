"""Model builders: megatron-core GPT (Llama/Qwen2/Qwen3), the speech student and the text teacher."""

from .config import GPTModelConfig, ModelConfigError, RecomputeConfig
from .gpt import build_gpt_model, to_transformer_config, vocab_shard_range
from .sharding import gather_canonical_state_dict, load_canonical_state_dict
from .speech import (
    FeaturePerception,
    PerceptionConfig,
    SpeechStudent,
    audio_locator_id,
    check_vocab_partition,
    common_padded_vocab,
    expand_audio_locators,
)
from .teacher import build_teacher

__all__ = [
    "FeaturePerception",
    "GPTModelConfig",
    "ModelConfigError",
    "PerceptionConfig",
    "RecomputeConfig",
    "SpeechStudent",
    "audio_locator_id",
    "build_gpt_model",
    "build_teacher",
    "check_vocab_partition",
    "common_padded_vocab",
    "expand_audio_locators",
    "gather_canonical_state_dict",
    "load_canonical_state_dict",
    "to_transformer_config",
    "vocab_shard_range",
]
