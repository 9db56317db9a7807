"""The local spec's training attention (PyTorch SDPA, ``models/attention.py``) against megatron-core's unfused
``DotProductAttention``: values and gradients, causal and with a padding mask, grouped-query heads, at TP = 1 and
at TP = 2 with sequence parallelism (each rank holds its heads), float32 and float64."""

from __future__ import annotations

import pytest
import torch

from megatron_xopd.testing import run_distributed

HEADS, GROUPS, DIM, SEQ, BATCH = 4, 2, 8, 12, 3
PAD = (0, 4, 2)  # left padding of each row of the masked case


def _padding_mask() -> torch.Tensor:
    """[b, 1, s, s], True = masked: causal, and no query sees a padding key but its own (as the rollouts' mask)."""
    keys = torch.arange(SEQ)
    queries = keys[:, None]
    pad = torch.tensor(PAD)
    mask = (keys[None, None, :] < pad[:, None, None]) & (keys != queries)[None]
    return (mask | (keys > queries)[None])[:, None]


def _compare(masked: bool, dtype: torch.dtype) -> dict[str, float]:
    """Max |SDPA - megatron| over this rank's heads: the output and the gradients of query, key and value."""
    from megatron.core import parallel_state
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_xopd.models.attention import SDPAttention
    from megatron_xopd.runtime.seed import set_seed

    set_seed(1)  # megatron's unfused path forks the model-parallel RNG tracker (for its dropout)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, kv_channels=DIM, tensor_model_parallel_size=tp,
                               sequence_parallel=tp > 1, params_dtype=dtype, use_cpu_initialization=True,
                               masked_softmax_fusion=False, attention_softmax_in_fp32=True, attention_dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    q_all = torch.randn(SEQ, BATCH, HEADS, DIM, generator=gen, dtype=dtype)
    k_all, v_all = (torch.randn(SEQ, BATCH, GROUPS, DIM, generator=gen, dtype=dtype) for _ in range(2))
    upstream = torch.randn(SEQ, BATCH, HEADS // tp * DIM, generator=gen, dtype=dtype)
    hs, gs = HEADS // tp, GROUPS // tp
    inputs = (q_all[:, :, rank * hs:(rank + 1) * hs], k_all[:, :, rank * gs:(rank + 1) * gs],
              v_all[:, :, rank * gs:(rank + 1) * gs])
    mask = _padding_mask() if masked else None
    results = {}
    for cls in (DotProductAttention, SDPAttention):
        module = cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self").train()
        assert cls is DotProductAttention or module._sdpa_applies(SEQ, SEQ, mask, None, None)  # not megatron's
        leaves = [x.clone().requires_grad_() for x in inputs]
        out = module(*leaves, mask)
        out.backward(upstream)
        results[cls.__name__] = [out.detach(), *(x.grad for x in leaves)]
    return {name: (a - b).abs().max().item()
            for name, a, b in zip(("out", "dq", "dk", "dv"), results["DotProductAttention"], results["SDPAttention"])}


@pytest.mark.parity
@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_training_attention_equals_megatron_dot_product_attention(tp):
    results = run_distributed(_compare_all, tp, tp=tp)
    for rank, cases in enumerate(results):
        for case, errors in cases.items():
            assert max(errors.values()) <= 1e-5, (tp, rank, case, errors)


def _compare_all() -> dict[str, dict[str, float]]:
    _dropout_falls_back()
    return {f"{'masked' if masked else 'causal'}-{str(dtype)[6:]}": _compare(masked, dtype)
            for masked in (False, True) for dtype in (torch.float32, torch.float64)}


def test_training_model_uses_sdpa_without_transformer_engine():
    """The local spec (no TE) builds every layer's core attention as SDPAttention (which takes the SDPA path in
    training: checked in the comparison above, with megatron's path under attention dropout)."""
    from megatron_xopd.models.attention import SDPAttention
    from megatron_xopd.models.config import GPTModelConfig
    from megatron_xopd.models.gpt import layer_spec

    cfg = GPTModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, vocab_size=64,
                         transformer_impl="local")
    assert layer_spec(cfg).submodules.self_attention.submodules.core_attention is SDPAttention


def _dropout_falls_back() -> None:
    """SDPA in training only without attention dropout (SDPA would draw other masks than megatron's tracker)."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_xopd.models.attention import SDPAttention

    for p, train, want in ((0.0, True, True), (0.1, True, False), (0.1, False, True)):
        config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, attention_dropout=p,
                                   use_cpu_initialization=True)
        module = SDPAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
        module.train(train)
        assert module._sdpa_applies(8, 8, None, None, None) is want, (p, train)
