"""The finite-step guard: a step whose loss or gradients are not finite changes no weight on any rank.

Megatron's FP32 and BF16 optimizers step on whatever gradients they get (only the FP16 loss scaler checks for
inf/NaN), so one NaN would be trained on and then saved. Before each optimizer step every rank checks its loss
and its reduced gradient buffers; the ranks agree with one all-reduce (a NaN on one rank skips the update on all,
so the replicas stay identical); a skipped update is counted and logged with its step, and
``trainer.max_bad_steps`` consecutive ones stop the run. :func:`check_finite_weights` keeps a checkpoint from
ever being written from non-finite weights.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from ..runtime.reduce import all_ranks_agree

log = logging.getLogger("megatron_xopd")


class NonFiniteError(RuntimeError):
    """Training cannot go on: too many consecutive non-finite steps, or non-finite weights."""


def grads_finite(ddp: torch.nn.Module) -> bool:
    """Whether this rank's megatron DDP gradient buffers (after the DP reduction) hold only finite values."""
    return all(bool(torch.isfinite(b.grad_data).all()) for b in ddp.buffers + ddp.expert_parallel_buffers)


class FiniteStepGuard:
    """Decides, on all ranks alike, whether an optimizer update may be applied, and counts the refused ones."""

    def __init__(self, max_bad_steps: int) -> None:
        if max_bad_steps < 1:
            raise ValueError(f"trainer.max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.consecutive = 0
        self.total = 0

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])

    def update_allowed(self, ddp: torch.nn.Module, loss: float) -> bool:
        """Collective: the loss of this rank's micro-batches and its gradients are finite on every rank."""
        return all_ranks_agree(math.isfinite(loss) and grads_finite(ddp))

    def end_step(self, step: int, ok: bool, *, loss: float, grad_norm: float) -> None:
        """Record the outcome of ``step`` (1-based), logged when its update was skipped."""
        if ok:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if dist.get_rank() == 0:
            log.warning("step %d: non-finite loss (%s) or gradients (grad norm %s); the update was skipped on every "
                        "rank (%d in a row, %d in all)", step, loss, grad_norm, self.consecutive, self.total)

    def raise_if_exhausted(self, step: int) -> None:
        """Stop the run after ``max_bad_steps`` consecutive skipped updates (called once the step is logged)."""
        if self.consecutive >= self.max_bad_steps:
            raise NonFiniteError(
                f"step {step}: {self.consecutive} consecutive steps with a non-finite loss or gradients "
                f"(trainer.max_bad_steps={self.max_bad_steps}); the weights are those after the last finite step. "
                "Lower optim.lr, check the data, or raise trainer.max_bad_steps"
            )


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """Collective: raise if any rank holds a non-finite parameter (so that it is never checkpointed)."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if not all_ranks_agree(not bad):
        raise NonFiniteError(f"{where}: non-finite weights ({', '.join(bad[:5]) or 'on another rank'}); "
                             "no checkpoint is written from them")
