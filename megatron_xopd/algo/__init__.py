"""The X-OPD objective: the rollout batch type, its sequences, one function per loss kind, weights, metrics."""

from .config import CROSS_MODAL, IN_MODAL, LOSSES, RESPONSES, XOPDConfig
from .loss import (
    LOSS_FUNCTIONS,
    LossInputs,
    LossOutput,
    divergence_loss,
    policy_gradient_terms,
    rollout_weights,
    sampled_token_loss,
    sft_loss,
    reads_hidden,
    teacher_keeps,
    token_advantages,
    topk_loss,
    weighted_loss,
)
from .metrics import LossStats, rollout_sums, step_metrics
from .rollouts import Rollouts
from .teacher import TeacherScores, clear_teacher_scores, store_teacher_scores, teacher_scores
from .sequences import PackedSequences, pack_sequences, response_logits, response_logprobs

__all__ = [
    "CROSS_MODAL",
    "IN_MODAL",
    "LOSSES",
    "LOSS_FUNCTIONS",
    "LossInputs",
    "LossOutput",
    "LossStats",
    "PackedSequences",
    "RESPONSES",
    "Rollouts",
    "XOPDConfig",
    "divergence_loss",
    "pack_sequences",
    "policy_gradient_terms",
    "response_logits",
    "response_logprobs",
    "rollout_sums",
    "rollout_weights",
    "sampled_token_loss",
    "sft_loss",
    "reads_hidden",
    "teacher_keeps",
    "topk_loss",
    "step_metrics",
    "TeacherScores",
    "clear_teacher_scores",
    "store_teacher_scores",
    "teacher_scores",
    "token_advantages",
    "weighted_loss",
]
