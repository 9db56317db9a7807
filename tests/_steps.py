"""X-OPD optimizer steps on fixed rollouts at one layout, for the parity tests that compare layouts
(tests/test_scale.py, test_ep.py, test_reshard.py): every layout computes the same global step, DP rank d training
rows d, d + DP, ... (unless told otherwise) with weights normalised by the global counts."""

from __future__ import annotations

import torch

from megatron_xopd.algo import CROSS_MODAL, IN_MODAL, XOPDConfig
from tests._models import VOCAB

LR = 1e-3


def optimizer_steps(layout, student, teacher, *, steps: int = 1, micro_batch_size: int = 2,
                    teacher_micro_batch_size: int | None = None, rows: torch.Tensor | None = None,
                    load_from: str | None = None, save_to: str | None = None):
    """``steps`` optimizer steps of ``student`` (built at ``layout``, megatron's groups initialised) on the fixed
    rollouts of tests/test_trainer_passes.py scored by ``teacher``, after loading ``load_from`` and saved to
    ``save_to`` after the last. Returns each step's (global loss, grad norm, full weights) and the rollouts."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_xopd.algo import LossStats, rollout_weights
    from megatron_xopd.models import gather_canonical_state_dict
    from megatron_xopd.runtime.reduce import reduce_over_replicas
    from megatron_xopd.trainer import checkpoint
    from megatron_xopd.trainer.build import build_optimizer, wrap_ddp
    from megatron_xopd.trainer.config import OptimSection
    from megatron_xopd.trainer.passes import score_with_teacher, train_pass
    from tests.test_trainer_passes import _rollouts

    r = _rollouts(student)
    cfg = XOPDConfig(lam=0.5, loss="sampled_token", responses="on_policy")
    ddp = wrap_ddp(student, layout)
    optimizer, _ = build_optimizer(ddp, OptimSection(lr=LR, adam_eps=1e-4, clip_grad=0.0), max_steps=10)
    if load_from:
        checkpoint.load_checkpoint(load_from, student, optimizer)
    score_with_teacher(teacher, r, teacher_micro_batch_size or micro_batch_size, VOCAB, cfg)
    counts = {m: float((r.modality == m).sum()) for m in (IN_MODAL, CROSS_MODAL)}
    tokens = {m: float(r.lengths[r.modality == m].sum()) for m in (IN_MODAL, CROSS_MODAL)}
    r.weights = rollout_weights(r.lengths, r.modality, cfg, global_rollouts=counts, global_tokens=tokens)
    if rows is None:
        dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        rows = torch.arange(len(r))[dp_rank::dp]
    out = []
    for _ in range(steps):
        stats = LossStats()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        train_pass(ddp, r, rows, cfg, micro_batch_size, VOCAB, stats)
        updated, grad_norm, _ = optimizer.step()
        assert updated
        loss = reduce_over_replicas({"loss": stats.loss})["loss"]
        weights = gather_canonical_state_dict(student.language_model, VOCAB + 1)
        out.append((loss, float(grad_norm), {k: v.clone() for k, v in weights.items()}))  # not views of the next step
    if save_to:
        checkpoint.save_checkpoint(save_to, steps, student, optimizer, {})
    dist.barrier()
    return out, r
