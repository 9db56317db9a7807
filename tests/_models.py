"""Tiny models and batches shared by the tests (importable by spawned ranks)."""

from __future__ import annotations

import torch

from megatron_xopd.models import GPTModelConfig, PerceptionConfig

VOCAB = 301  # not a multiple of anything: exercises the vocab padding


def tiny_gpt_config(family: str = "llama", **overrides) -> GPTModelConfig:
    values = dict(
        family=family,
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        rotary_base=10000.0 if family == "llama" else 1000000.0,
        tie_word_embeddings=family == "qwen2",
    )
    values.update(overrides)
    return GPTModelConfig(**values)


def tiny_perception_config(feature_dim: int = 16) -> PerceptionConfig:
    return PerceptionConfig(
        source="features",
        feature_dim=feature_dim,
        nemo={"modality_adapter": {"_target_": "nemo.collections.speechlm2.modules.perception.IdentityConnector"}},
    )


def token_batch(batch: int = 2, seq: int = 9, vocab: int = VOCAB, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    pos = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    return ids, pos
