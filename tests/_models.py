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


def canonical_weights(cfg: GPTModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random full weights of ``cfg`` in the canonical form, the same on every rank for a given seed."""
    g = torch.Generator().manual_seed(seed)
    h, f, heads, groups, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim

    def rand(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    weights = {"embedding.word_embeddings.weight": rand(cfg.vocab_size, h, scale=0.5),
               "decoder.final_layernorm.weight": 1 + rand(h, scale=0.1)}
    if not cfg.tie_word_embeddings:
        weights["output_layer.weight"] = rand(cfg.vocab_size, h, scale=0.2)
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        weights[p + "self_attention.linear_qkv.layer_norm_weight"] = 1 + rand(h, scale=0.1)
        weights[p + "self_attention.linear_qkv.weight"] = rand((heads + 2 * groups) * d, h)
        if cfg.add_qkv_bias:
            weights[p + "self_attention.linear_qkv.bias"] = rand((heads + 2 * groups) * d)
        if cfg.qk_layernorm:
            weights[p + "self_attention.q_layernorm.weight"] = 1 + rand(d, scale=0.1)
            weights[p + "self_attention.k_layernorm.weight"] = 1 + rand(d, scale=0.1)
        weights[p + "self_attention.linear_proj.weight"] = rand(h, heads * d)
        weights[p + "mlp.linear_fc1.layer_norm_weight"] = 1 + rand(h, scale=0.1)
        weights[p + "mlp.linear_fc1.weight"] = rand(2 * f, h)
        weights[p + "mlp.linear_fc2.weight"] = rand(h, f)
    return weights
