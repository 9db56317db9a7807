"""The X-OPD objective (arXiv 2603.24596, Eqs. 1-5) and its full-vocabulary variants.

Per-token advantages, scored by the text teacher given the text prompt T (constants, no gradient):
    A_cm(y_t) = log p_teacher(y_t | T, y<t) - log p_old(y_t | S, y<t)
    A_im(y_t) = log p_teacher(y_t | T, y<t) - log p_old(y_t | T, y<t)
Objective, maximised: L = lam * L_im + (1 - lam) * L_cm, with
    L_x = mean over rollouts j of (1/|y_j|) * sum_t r_jt * A_x(y_jt),   r = p_theta / p_old.

Every rollout j gets one scalar weight c_j (see :func:`rollout_weights`) so that a sum over micro-batches and
data-parallel ranks reproduces the per-modality means exactly: the loss is -sum_j c_j * sum_t r_jt * A_jt.
``normalization="token"`` replaces the per-sequence mean by a mean over all tokens of the modality.
The variants replace r*A by an exact per-token divergence of the student from the teacher over the whole
(vocab-parallel) vocabulary: ``reverse_kl`` (KL(student || teacher)) or ``jsd`` (generalised JSD, TRL's beta); by
default (``divergence_form="linear"``) from both models' final hidden states through their output-layer shards,
chunk by chunk, so no [rows, length, V/TP] logits are kept (the sampled-token and SFT losses read their
log-probs the same way). ``topk_reverse_kl`` / ``topk_forward_kl`` compare the
student with the teacher's top-k tokens plus one tail bucket for the rest of the vocabulary.

The paper's baselines run through the same weights: ``loss="sft"`` maximises log p_theta(y_t) of given responses,
and ``responses="teacher_greedy"`` takes those responses from the teacher's greedy answer to T instead of student
samples. Together they are "offline KD" (SFT on the teacher's responses); with only the perception trainable and
lam = 0 they align a speech adapter to the LLM's behaviour. ``responses="transcript"`` (the text of T as the
answer to S) is speech-recognition alignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..ops import (
    fused_linear_divergence_loss,
    fused_linear_logprobs,
    vocab_parallel_divergence,
    vocab_parallel_topk_divergence,
)
from .config import XOPDConfig
from .sequences import PackedSequences, response_logits, response_logprobs


def token_advantages(teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """A_t = log p_teacher - log p_old, detached (Eqs. 1-2)."""
    return (teacher_logprobs - old_logprobs).detach()


def rollout_weights(
    lengths: torch.Tensor,
    modality: torch.Tensor,
    cfg: XOPDConfig,
    *,
    global_rollouts: dict[int, float],
    global_tokens: dict[int, float],
) -> torch.Tensor:
    """c_j: the weight of rollout j's token sum in the loss, from batch-global counts per modality.

    sequence: c_j = w_x / (N_x * |y_j|); token: c_j = w_x / T_x, where w_im = lam, w_cm = 1 - lam, N_x is the
    number of rollouts and T_x the number of response tokens of modality x over the whole step (all ranks).
    """
    weights = torch.zeros(lengths.shape, dtype=torch.float64)
    for m, w in cfg.modality_weights.items():
        sel = modality == m
        if not bool(sel.any()) or w == 0.0:
            continue
        if cfg.normalization == "sequence":
            weights[sel] = w / (global_rollouts[m] * lengths[sel].clamp(min=1).double())
        else:
            weights[sel] = w / max(global_tokens[m], 1.0)
    return weights.float() * cfg.coef


def policy_gradient_terms(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token r_t * A_t (or its PPO-clipped form), masked; and the ratio r_t (for logging).

    The gradient of r_t * A_t is r_t * A_t * grad log p_theta: at r = 1 it is the on-policy policy gradient.
    """
    ratio = torch.exp(new_logprobs - old_logprobs.detach())
    surrogate = ratio * advantages
    if clip_ratio is not None:
        clipped = ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio) * advantages
        surrogate = torch.minimum(surrogate, clipped)
    return surrogate * mask, ratio.detach()


def weighted_loss(per_token: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, *, maximise: bool) -> torch.Tensor:
    """-sum_j c_j sum_t x_jt for an objective (``maximise``), +sum_j c_j sum_t x_jt for a divergence."""
    total = ((per_token * mask).sum(dim=-1) * weights.to(per_token.dtype)).sum()
    return -total if maximise else total


@dataclass
class LossInputs:
    """What one micro-batch's loss reads, on the last pipeline stage and this rank's vocabulary shard.

    Rows are rollouts; padding rows (filling the last micro-batch) have weight 0 and an all-zero mask.
    """

    logits: torch.Tensor  # [b, S, V/TP] the student's vocab-parallel logits, or [b, S, H] its final hidden states
    packed: PackedSequences  # where each response token sits in the sequence
    mask: torch.Tensor  # [b, L] float: real response tokens of real rows
    weights: torch.Tensor  # [b] c_j (0 for padding rows)
    old_logprobs: torch.Tensor  # [b, L] log p_old(y_t), recorded at sampling time
    teacher_logprobs: torch.Tensor | None  # [b, L] log p_teacher(y_t | T, y<t)
    teacher_logits: torch.Tensor | None  # [b, L, V/TP] the teacher's logits at the response positions
    text_vocab_size: int
    head_weight: torch.Tensor | None = None  # [V/TP, H] student output-layer shard: ``logits`` are hidden states
    teacher_hidden: torch.Tensor | None = None  # [b, L, H_t] the teacher's final hidden states (linear form)
    teacher_head: torch.Tensor | None = None  # [V/TP, H_t] the teacher's output-layer shard (linear form)
    teacher_topk_ids: torch.Tensor | None = None  # [b, L, k] the teacher's top-k global token ids
    teacher_topk_logprobs: torch.Tensor | None = None  # [b, L, k] their log-probs at ``xopd.kl_temperature``


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to minimise: the micro-batch's share of the step loss
    terms: torch.Tensor  # [b, L] per-token terms of the objective (or divergence), masked
    ratio: torch.Tensor | None = None  # [b, L] r_t = p_theta / p_old (sampled-token loss only), detached


def student_logprobs(x: LossInputs) -> torch.Tensor:
    """log p_theta of the response tokens [b, L]: from the logits, or (``head_weight`` given) from the final hidden
    states at the response positions through the head shard, chunk by chunk."""
    if x.head_weight is None:
        return response_logprobs(x.logits, x.packed, x.text_vocab_size)
    hidden = response_logits(x.logits, x.packed)
    b, length, width = hidden.shape
    targets = x.packed.response_tokens.to(hidden.device).reshape(-1)
    return fused_linear_logprobs(hidden.reshape(b * length, width), x.head_weight, targets,
                                 vocab_size=x.text_vocab_size).view(b, length)


def sft_loss(x: LossInputs, cfg: XOPDConfig) -> LossOutput:
    """Supervised fine-tuning on given responses (offline KD, speech alignment), maximised:
    x_jt = log p_theta(y_jt),  loss = -sum_j c_j sum_t x_jt."""
    terms = student_logprobs(x) * x.mask
    return LossOutput(weighted_loss(terms, x.mask, x.weights, maximise=True), terms)


def sampled_token_loss(x: LossInputs, cfg: XOPDConfig) -> LossOutput:
    """The paper's X-OPD loss (Eqs. 1-5), maximised:
    x_jt = r_jt * A_jt,  r_jt = p_theta(y_jt) / p_old(y_jt),  A_jt = log p_teacher(y_jt | T) - log p_old(y_jt),
    loss = -sum_j c_j sum_t x_jt (PPO-clipped with ``xopd.clip_ratio``)."""
    new_logprobs = student_logprobs(x)
    advantages = token_advantages(x.teacher_logprobs, x.old_logprobs)
    terms, ratio = policy_gradient_terms(new_logprobs, x.old_logprobs, advantages, x.mask, cfg.clip_ratio)
    return LossOutput(weighted_loss(terms, x.mask, x.weights, maximise=True), terms, ratio)


def divergence_loss(x: LossInputs, cfg: XOPDConfig) -> LossOutput:
    """Exact full-vocabulary divergence of the student from the teacher at every response position, minimised:
    reverse_kl: D_jt = KL(p_theta || p_teacher);  jsd: D_jt = beta KL(p_T || M) + (1 - beta) KL(p_theta || M),
    M = beta p_T + (1 - beta) p_theta (TRL's GKD; beta = 0 / 1 are the forward / reverse KL);  loss = +sum_j c_j sum_t D_jt.
    Both on temperature-scaled vocab-parallel logits (``xopd.kl_temperature``), nothing gathered; in the linear
    form the logits are built from the hidden states one token chunk at a time and never kept."""
    student = response_logits(x.logits, x.packed)
    b, length, width = student.shape
    common = dict(beta=cfg.beta, temperature=cfg.kl_temperature, mask=x.mask.reshape(-1).bool(),
                  vocab_size=x.text_vocab_size)
    if x.head_weight is not None:
        # The loss is linear in the terms with known coefficients: the fused op takes the gradient in its forward.
        coefficients = (x.mask * x.weights[:, None].to(x.mask.dtype)).reshape(-1)
        teacher = x.teacher_hidden.reshape(b * length, -1)
        loss, terms = fused_linear_divergence_loss(student.reshape(b * length, width), x.head_weight, teacher,
                                                   x.teacher_head, cfg.loss, coefficients, **common)
        return LossOutput(loss, terms.view(b, length))
    terms = vocab_parallel_divergence(student.reshape(b * length, width),
                                      x.teacher_logits.reshape(b * length, width), cfg.loss, **common).view(b, length)
    return LossOutput(weighted_loss(terms, x.mask, x.weights, maximise=False), terms)


TOPK_KINDS = {"topk_reverse_kl": "reverse_kl", "topk_forward_kl": "forward_kl"}


def topk_loss(x: LossInputs, cfg: XOPDConfig) -> LossOutput:
    """Divergence of the student from the teacher's top-k tokens I plus a tail bucket (every other token), minimised:
    topk_reverse_kl: D_jt = sum_{i in I + tail} q_i log(q_i / p_i);  topk_forward_kl: D_jt = sum p_i log(p_i / q_i),
    where p are the teacher's bucket probabilities (at ``xopd.kl_temperature``) and q the student's, from its
    vocab-parallel logits / temperature;  loss = +sum_j c_j sum_t D_jt."""
    student = response_logits(x.logits, x.packed)
    b, length, v_local = student.shape
    k = x.teacher_topk_ids.shape[-1]
    terms = vocab_parallel_topk_divergence(
        student.reshape(b * length, v_local),
        x.teacher_topk_ids.reshape(b * length, k),
        x.teacher_topk_logprobs.reshape(b * length, k),
        kind=TOPK_KINDS[cfg.loss],
        temperature=cfg.kl_temperature,
        mask=x.mask.reshape(-1).bool(),
        vocab_size=x.text_vocab_size,
    ).view(b, length)
    return LossOutput(weighted_loss(terms, x.mask, x.weights, maximise=False), terms)


LOSS_FUNCTIONS: dict[str, Callable[[LossInputs, XOPDConfig], LossOutput]] = {
    "sft": sft_loss,
    "sampled_token": sampled_token_loss,
    "reverse_kl": divergence_loss,
    "jsd": divergence_loss,
    "topk_reverse_kl": topk_loss,
    "topk_forward_kl": topk_loss,
}


def teacher_keeps(cfg: XOPDConfig) -> str:
    """What the teacher pass keeps beyond the sampled tokens' log-probs: ``logits`` / ``hidden`` (full-vocabulary
    losses, logits or linear form), ``topk`` (the top-k losses) or ``logprobs`` (nothing more)."""
    if LOSS_FUNCTIONS[cfg.loss] is divergence_loss:
        return "hidden" if cfg.divergence_form == "linear" else "logits"
    return "topk" if LOSS_FUNCTIONS[cfg.loss] is topk_loss else "logprobs"


def reads_hidden(cfg: XOPDConfig) -> bool:
    """Whether the passes take the models' final hidden states instead of their logits (the output layer bypassed,
    the loss applying the head shard to the response positions): the linear form, for every loss but top-k."""
    return cfg.divergence_form == "linear" and teacher_keeps(cfg) != "topk"
