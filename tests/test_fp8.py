"""FP8 is Transformer Engine's: without it ``model.fp8`` is a config error (megatron-core would accept the field and
the local spec would silently train in ``params_dtype``); with it, training pads each sequence to FP8's multiple."""

from __future__ import annotations

import pytest
import torch

from megatron_xopd.models import ModelConfigError
from megatron_xopd.models.config import GPTModelConfig
from megatron_xopd.models.gpt import to_transformer_config, transformer_engine_usable

_SHAPE = dict(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, vocab_size=64)


def test_fp8_without_transformer_engine_is_a_config_error_naming_the_key():
    with pytest.raises(ModelConfigError, match=r"model\.fp8: 'bf8' is not null\|e4m3\|hybrid"):
        GPTModelConfig(**_SHAPE, fp8="bf8")
    # the local spec has no FP8, with or without TE
    with pytest.raises(ModelConfigError, match=r"model\.fp8: 'hybrid' needs Transformer Engine .*'local'"):
        to_transformer_config(GPTModelConfig(**_SHAPE, fp8="hybrid", transformer_impl="local"))
    if transformer_engine_usable():
        pytest.skip("Transformer Engine is usable here: model.fp8 is valid with the default transformer_impl")
    with pytest.raises(ModelConfigError, match=r"model\.fp8: 'e4m3' needs Transformer Engine"):
        to_transformer_config(GPTModelConfig(**_SHAPE, fp8="e4m3"))


@pytest.mark.parametrize("tp", [1, 2])
def test_fp8_training_pads_each_sequence_shard_to_16(monkeypatch, tp):
    from megatron.core import parallel_state

    from megatron_xopd.algo import Rollouts
    from megatron_xopd.trainer.passes import micro_batches

    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: tp)
    lengths = torch.tensor([3, 5])
    rollouts = Rollouts(
        modality=torch.zeros(2, dtype=torch.long), prompt_index=torch.arange(2), student_prompts=[[1, 2, 3], [4, 5]],
        teacher_prompts=[[1, 2, 3], [4, 5]], responses=torch.ones(2, 5, dtype=torch.long), lengths=lengths,
        old_logprobs=torch.zeros(2, 5), audio_embeds=[None, None],
    )
    for fp8, want in ((False, 8), (True, 16 * tp)):  # 3 + 5 tokens: a multiple of TP, of 16 x TP with FP8
        (batch,) = micro_batches(rollouts, torch.arange(2), 2, teacher=True, fp8=fp8)
        assert batch.packed.input_ids.shape == (2, want), (fp8, tp)
