"""The last stage's output layer, bypassed: the model returns its final hidden states and the caller applies the
vocab-parallel head chunk by chunk (``ops.fused_linear_divergence``), so no [b, S, V/TP] logits exist.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from .sharding import _unwrap


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The megatron ``GPTModel`` inside DDP / the speech student."""
    model = _unwrap(model)
    return getattr(model, "language_model", model)


@contextlib.contextmanager
def hidden_states_output(model: torch.nn.Module) -> Iterator[torch.Tensor | None]:
    """Within, ``model(...)`` returns the final hidden states [b, S, H] on the last stage instead of logits, and
    yields this rank's output-layer shard [V/TP, H] (the tied embedding when shared); ``None`` off the last stage.

    The output layer's input mapping is kept where it matters: under sequence parallelism the hidden states are
    gathered over the sequence (their gradient is split back, not reduce-scattered, since the fused-linear op
    already sums its hidden-state gradient over the TP group); without it they pass through as they are.
    """
    gpt = language_model(model)
    if not gpt.post_process:
        yield None
        return
    layer = gpt.output_layer
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else layer.weight

    def forward(input_, weight=None, runtime_gather_output=None):
        if layer.sequence_parallel:
            input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False)
        return input_, None

    layer.forward = forward
    try:
        yield weight
    finally:
        del layer.forward
