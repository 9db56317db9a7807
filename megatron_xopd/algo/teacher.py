"""What the teacher pass keeps of each micro-batch: the sampled tokens' log-probs, plus what the loss reads
(:func:`megatron_xopd.algo.loss.teacher_keeps`): response logits, final hidden states, or the top-k tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import fused_linear_logprobs, vocab_parallel_topk
from .config import XOPDConfig
from .rollouts import Rollouts
from .sequences import PackedSequences, response_logits, response_logprobs


@dataclass
class TeacherScores:
    logprobs: torch.Tensor  # [b, L] log p_teacher(y_t | T, y<t), 0 past the length
    logits: torch.Tensor | None = None  # [b, L, V/TP]
    hidden: torch.Tensor | None = None  # [b, L, H_t]
    topk_ids: torch.Tensor | None = None  # [b, L, k]
    topk_logprobs: torch.Tensor | None = None  # [b, L, k]


@torch.no_grad()
def teacher_scores(
    output: torch.Tensor, packed: PackedSequences, keep: str, text_vocab_size: int, cfg: XOPDConfig,
    head: torch.Tensor | None = None,
) -> TeacherScores:
    """One micro-batch's scores from the teacher's last-stage output: vocab-parallel logits [b, S, V/TP], or, with
    ``head`` its output-layer shard (:func:`megatron_xopd.algo.loss.reads_hidden`), final hidden states
    [b, S, H_t], of which only the response positions go through the head."""
    if head is None:
        scores = TeacherScores(response_logprobs(output, packed, text_vocab_size))
        if keep == "logits":
            scores.logits = response_logits(output, packed)
        elif keep == "topk":
            selected = response_logits(output, packed)
            b, length, v_local = selected.shape
            ids, log_p = vocab_parallel_topk(selected.reshape(b * length, v_local), cfg.topk,
                                             vocab_size=text_vocab_size, temperature=cfg.kl_temperature)
            scores.topk_ids, scores.topk_logprobs = ids.view(b, length, -1), log_p.view(b, length, -1)
        return scores
    hidden = response_logits(output, packed)
    b, length, width = hidden.shape
    targets = packed.response_tokens.to(output.device).reshape(-1)
    logprobs = fused_linear_logprobs(hidden.reshape(b * length, width), head, targets, vocab_size=text_vocab_size)
    mask = packed.response_mask.to(logprobs.device)
    return TeacherScores(logprobs.view(b, length) * mask, hidden=hidden if keep == "hidden" else None)


def clear_teacher_scores(rollouts: Rollouts, head: torch.Tensor | None = None) -> None:
    """Before a teacher pass: zero log-probs (what non-last pipeline stages keep) and nothing else yet; ``head`` is
    the teacher's output-layer shard the linear form reads, kept as a tensor of its current storage: an offloaded
    teacher (``runtime/device.py: resident``) leaves it on the device, where the loss reads it."""
    rollouts.teacher_logprobs = torch.zeros_like(rollouts.old_logprobs)
    rollouts.teacher_logits = rollouts.teacher_hidden = None
    rollouts.teacher_topk_ids = rollouts.teacher_topk_logprobs = None
    rollouts.teacher_head = None if head is None else head.detach()


def store_teacher_scores(rollouts: Rollouts, rows: torch.Tensor, scores: TeacherScores) -> None:
    """Write a micro-batch's scores into the rollouts at ``rows`` (-1: padding rows, dropped)."""
    real = rows >= 0
    index = rows[real]
    rollouts.teacher_logprobs[index.to(rollouts.old_logprobs.device)] = (
        scores.logprobs[real].float().to(rollouts.old_logprobs.device))
    if scores.logits is not None:
        if rollouts.teacher_logits is None:
            rollouts.teacher_logits = [None] * len(rollouts)
        for i, r in enumerate(rows.tolist()):
            if r >= 0:
                rollouts.teacher_logits[r] = scores.logits[i].detach().clone()
    for name in ("hidden", "topk_ids", "topk_logprobs"):
        value = getattr(scores, name)
        if value is None:
            continue
        field = f"teacher_{name}"
        if getattr(rollouts, field) is None:
            setattr(rollouts, field, value.new_zeros((len(rollouts), *value.shape[1:])))
        getattr(rollouts, field)[index.to(value.device)] = value[real]
