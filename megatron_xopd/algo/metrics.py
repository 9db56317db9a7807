"""What a step reports about the objective: per-modality objectives, importance ratios, and the sampled KLs.

Each rank sums over its micro-batches and rollouts; the trainer reduces the sums over the reporting ranks
(``runtime/reduce.py``) and :func:`step_metrics` turns the global sums into the logged values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import CROSS_MODAL, IN_MODAL, XOPDConfig
from .loss import LossInputs, LossOutput, token_advantages
from .rollouts import Rollouts

_NAMES = {IN_MODAL: "im", CROSS_MODAL: "cm"}


@dataclass
class LossStats:
    """Sums over a step's micro-batches on this rank."""

    objective: dict[int, float] = field(default_factory=lambda: {IN_MODAL: 0.0, CROSS_MODAL: 0.0})
    ratio_sum: float = 0.0
    ratio_max: float = 0.0
    ratio_count: float = 0.0
    # |log p_theta - log p_old| of the sampled tokens while the weights are the rollouts' (``measure_gap``, the
    # first mini-batch): how far the training path's log-probs start from the decode's (r = 1 in exact math)
    measure_gap: bool = True
    gap_sum: float = 0.0
    gap_max: float = 0.0
    gap_count: float = 0.0
    loss: float = 0.0

    @torch.no_grad()
    def add(self, x: LossInputs, out: LossOutput, modality: torch.Tensor, cfg: XOPDConfig) -> None:
        """Accumulate one micro-batch: L_x undoes the weights' w_x and coef, so it is the paper's L_im / L_cm."""
        per_row = (out.terms.detach() * x.mask).sum(dim=1) * x.weights
        for m, w in cfg.modality_weights.items():
            if w > 0:
                self.objective[m] += float(per_row[modality == m].sum()) / (w * cfg.coef)
        if out.ratio is not None:
            valid = x.mask.bool()
            if valid.any():
                self.ratio_sum += float(out.ratio[valid].sum())
                self.ratio_max = max(self.ratio_max, float(out.ratio[valid].max()))
                self.ratio_count += float(valid.sum())
                if self.measure_gap:
                    gap = out.ratio[valid].double().log().abs()  # r = exp(log p_theta - log p_old)
                    self.gap_sum += float(gap.sum())
                    self.gap_max = max(self.gap_max, float(gap.max()))
                    self.gap_count += float(valid.sum())
        self.loss += float(out.loss.detach())

    def sums(self) -> dict[str, float]:
        return {"L_im": self.objective[IN_MODAL], "L_cm": self.objective[CROSS_MODAL], "loss": self.loss,
                "ratio_sum": self.ratio_sum, "ratio_count": self.ratio_count, "gap_sum": self.gap_sum,
                "gap_count": self.gap_count}


def rollout_sums(rollouts: Rollouts, on_policy: bool) -> dict[str, float]:
    """Per modality: the summed advantages (the sampled reverse-KL estimate, on the student's own samples only),
    response tokens and rollouts."""
    mask = rollouts.response_mask()
    sums: dict[str, float] = {}
    for m, name in _NAMES.items():
        rows = rollouts.modality == m
        sel = rows.unsqueeze(1) & mask
        adv = 0.0
        if rollouts.teacher_logprobs is not None and on_policy:
            adv = float(token_advantages(rollouts.teacher_logprobs, rollouts.old_logprobs)[sel].sum())
        sums.update({f"adv_{name}": adv, f"tok_{name}": float(sel.sum()), f"n_{name}": float(rows.sum())})
    return sums


def step_metrics(g: dict[str, float], ratio_max: float, on_policy: bool, gap_max: float = float("nan")
                 ) -> dict[str, float]:
    """Logged values from the globally reduced sums of :class:`LossStats` and :func:`rollout_sums` (and the
    reduced maxima of the ratio and of the log-prob gap).

    ``kl_x = -mean_t A_t`` is the Monte-Carlo estimate of KL(student || teacher) on modality x's samples.
    ``logprob_gap_mean``/``_max``: |log p_theta - log p_old| over the first mini-batch's response tokens, where
    both are the same weights' (the rollout's decode vs the training forward); NaN without a ratio (other losses).
    """
    nan = float("nan")
    out = {
        "loss": g["loss"],
        "L_im": g["L_im"],
        "L_cm": g["L_cm"],
        "ratio_mean": g["ratio_sum"] / g["ratio_count"] if g["ratio_count"] else nan,
        "ratio_max": ratio_max,
        "logprob_gap_mean": g["gap_sum"] / g["gap_count"] if g.get("gap_count") else nan,
        "logprob_gap_max": gap_max if g.get("gap_count") else nan,
    }
    for name in _NAMES.values():
        out[f"kl_{name}"] = -g[f"adv_{name}"] / g[f"tok_{name}"] if g[f"tok_{name}"] and on_policy else nan
        out[f"response_len_{name}"] = g[f"tok_{name}"] / g[f"n_{name}"] if g[f"n_{name}"] else nan
    return out
