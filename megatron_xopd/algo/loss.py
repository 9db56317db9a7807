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
(vocab-parallel) vocabulary: ``reverse_kl`` (KL(student || teacher)) or ``jsd`` (generalised JSD, TRL's beta).

The paper's baselines run through the same weights: ``loss="sft"`` maximises log p_theta(y_t) of given responses,
and ``responses="teacher_greedy"`` takes those responses from the teacher's greedy answer to T instead of student
samples. Together they are "offline KD" (SFT on the teacher's responses); with only the perception trainable and
lam = 0 they align a speech adapter to the LLM's behaviour. ``responses="transcript"`` (the text of T as the
answer to S) is speech-recognition alignment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSSES = ("sampled_token", "reverse_kl", "jsd", "sft")
RESPONSES = ("on_policy", "teacher_greedy", "transcript")
IN_MODAL, CROSS_MODAL = 0, 1  # modality of a rollout: prompted with T, or with S


@dataclass
class XOPDConfig:
    """The ``xopd`` config group."""

    lam: float = 0.5  # weight of the in-modal (text-prompted) term; 1 - lam for the cross-modal one
    n_samples: int = 4  # responses sampled per prompt and modality
    loss: str = "sampled_token"  # sampled_token (paper) | reverse_kl | jsd | sft (log-likelihood of the responses)
    # on_policy: n student samples | teacher_greedy: the teacher's greedy answer to T | transcript: T's text itself
    # (with loss=sft and lam=0: speech recognition, the usual first alignment of a speech adapter)
    responses: str = "on_policy"
    beta: float = 0.5  # JSD mixture weight of the teacher (TRL convention); 0 = forward KL, 1 = reverse KL
    kl_temperature: float = 1.0  # temperature of the full-vocabulary divergences
    coef: float = 1.0  # scales the whole loss
    normalization: str = "sequence"  # sequence: (1/|y|) sum_t (paper) | token: mean over all tokens
    clip_ratio: float | None = None  # PPO-style clip of r to [1 - eps, 1 + eps]; None in the paper
    minibatches: int = 1  # optimizer steps per rollout batch

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"xopd.lam must lie in [0, 1], got {self.lam}")
        if self.loss not in LOSSES:
            raise ValueError(f"xopd.loss: {self.loss!r} is not one of {LOSSES}")
        if self.responses not in RESPONSES:
            raise ValueError(f"xopd.responses: {self.responses!r} is not one of {RESPONSES}")
        if self.loss == "sft" and self.responses == "on_policy":
            raise ValueError("xopd.loss=sft trains on given responses: set xopd.responses=teacher_greedy or transcript")
        if self.responses == "transcript" and self.loss != "sft":
            raise ValueError("xopd.responses=transcript (speech recognition) has no teacher to match: set xopd.loss=sft")
        if self.loss == "sampled_token" and self.responses != "on_policy":
            raise ValueError("xopd.loss=sampled_token is the on-policy X-OPD loss: set xopd.responses=on_policy "
                             "(or use loss=sft / reverse_kl / jsd on the teacher's answers)")
        if self.normalization not in ("sequence", "token"):
            raise ValueError(f"xopd.normalization: {self.normalization!r} is not 'sequence' or 'token'")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"xopd.beta must lie in [0, 1], got {self.beta}")
        if self.clip_ratio is not None and self.clip_ratio <= 0:
            raise ValueError(f"xopd.clip_ratio must be positive or null, got {self.clip_ratio}")
        if self.n_samples < 1 or self.minibatches < 1:
            raise ValueError("xopd.n_samples and xopd.minibatches must be >= 1")

    @property
    def modalities(self) -> tuple[int, ...]:
        """The rollout modalities with a non-zero weight (lam = 1 or 0 drops the other term)."""
        return tuple(m for m, w in ((IN_MODAL, self.lam), (CROSS_MODAL, 1.0 - self.lam)) if w > 0)


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
    lam_of = {IN_MODAL: cfg.lam, CROSS_MODAL: 1.0 - cfg.lam}
    weights = torch.zeros(lengths.shape, dtype=torch.float64)
    for m, w in lam_of.items():
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
