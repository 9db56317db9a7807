"""The rollout batch: what a step's rollouts carry from collection through teacher scoring to the loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollouts:
    """A step's rollouts, identical on every rank of a TP/PP group (``audio_embeds`` on the first stage only).

    Filled in three phases: collection (``rollout/collect.py``: prompts, responses, ``old_logprobs``), teacher
    scoring (``trainer/passes.py``: ``teacher_logprobs``, and what the loss reads: ``teacher_logits``, ``teacher_hidden`` or ``teacher_topk_*``),
    and weighting (:func:`megatron_xopd.algo.loss.rollout_weights`: ``weights``).
    """

    modality: torch.Tensor  # [R] IN_MODAL | CROSS_MODAL
    prompt_index: torch.Tensor  # [R] index of the prompt in the batch
    student_prompts: list[list[int]]  # T prompt, or S prompt with the locator expanded to the audio frames
    teacher_prompts: list[list[int]]  # always the T prompt
    responses: torch.Tensor  # [R, L]
    lengths: torch.Tensor  # [R]
    old_logprobs: torch.Tensor  # [R, L] log p_old of each sampled token (0 past the length)
    audio_embeds: list[torch.Tensor | None]  # [frames, H] per speech rollout
    # the perception's inputs per speech rollout ([frames, D] features or [samples] audio), set when the
    # perception trains: the training pass then reruns it with gradients instead of using ``audio_embeds``
    audio_inputs: list[torch.Tensor | None] | None = None
    teacher_logprobs: torch.Tensor | None = None  # [R, L], last stage, after the teacher pass
    teacher_logits: list[torch.Tensor] | None = None  # per row [L, V/TP], for the logits-form divergence losses
    teacher_hidden: torch.Tensor | None = None  # [R, L, H_t] final hidden states, for the linear form
    teacher_head: torch.Tensor | None = None  # [V/TP, H_t] the teacher's output-layer shard, for the linear form
    teacher_topk_ids: torch.Tensor | None = None  # [R, L, k] the teacher's top-k ids, for the top-k losses
    teacher_topk_logprobs: torch.Tensor | None = None  # [R, L, k] their log-probs
    weights: torch.Tensor | None = None  # [R] c_j of the loss

    def __len__(self) -> int:
        return len(self.student_prompts)

    def response_mask(self) -> torch.Tensor:
        """[R, L] bool: the real (sampled or given) response tokens."""
        steps = torch.arange(self.responses.shape[1], device=self.lengths.device)
        return steps.unsqueeze(0) < self.lengths.unsqueeze(1)
