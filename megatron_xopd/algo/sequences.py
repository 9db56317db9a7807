"""Prompt + response sequences for the teacher and training passes, and per-token log-probs of responses.

Response token t of a rollout whose prompt has P tokens sits at position P + t and is predicted by the logits at
position P + t - 1. Student (speech or text prompt) and teacher (text prompt) sequences have different prompt
lengths; responses are aligned by this offset from the end of each prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..ops import vocab_parallel_logprobs


@dataclass
class PackedSequences:
    """A right-padded batch of prompt + response sequences."""

    input_ids: torch.Tensor  # [b, S]
    position_ids: torch.Tensor  # [b, S]
    response_positions: torch.Tensor  # [b, L]: position of the logits that predict response token t
    response_tokens: torch.Tensor  # [b, L]
    response_mask: torch.Tensor  # [b, L] float: 1 for real response tokens

    def to(self, device: torch.device) -> "PackedSequences":
        return PackedSequences(*(getattr(self, f.name).to(device) for f in fields(self)))


def pack_sequences(
    prompts: list[list[int]], responses: torch.Tensor, lengths: torch.Tensor, *, seq_len: int | None = None, pad_id: int = 0
) -> PackedSequences:
    """Build [prompt | response | pad] rows; ``seq_len`` pads every row to one length (pipeline stages need it)."""
    b, max_resp = responses.shape
    need = max(len(p) for p in prompts) + max_resp
    seq_len = need if seq_len is None else seq_len
    if seq_len < need:
        raise ValueError(f"seq_len {seq_len} is shorter than the longest prompt + response ({need})")
    input_ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    starts = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        input_ids[i, len(prompt) : len(prompt) + max_resp] = responses[i]
    steps = torch.arange(max_resp)
    mask = (steps.unsqueeze(0) < lengths.unsqueeze(1)).float()
    return PackedSequences(
        input_ids=input_ids,
        position_ids=torch.arange(seq_len).unsqueeze(0).expand(b, -1).contiguous(),
        response_positions=starts.unsqueeze(1) - 1 + steps.unsqueeze(0),
        response_tokens=responses.long() * mask.long(),
        response_mask=mask,
    )


def response_logits(logits: torch.Tensor, packed: PackedSequences) -> torch.Tensor:
    """[b, S, V_local] vocab-parallel logits -> [b, L, V_local] at the response positions."""
    index = packed.response_positions.to(logits.device).unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return logits.gather(1, index)


def response_logprobs(logits: torch.Tensor, packed: PackedSequences, text_vocab_size: int) -> torch.Tensor:
    """log p(response token) [b, L] from vocab-parallel logits, without gathering the vocabulary."""
    selected = response_logits(logits, packed)
    b, length, v_local = selected.shape
    logprobs = vocab_parallel_logprobs(
        selected.reshape(b * length, v_local), packed.response_tokens.reshape(-1).to(logits.device), vocab_size=text_vocab_size
    )
    return logprobs.view(b, length) * packed.response_mask.to(logprobs.device)
