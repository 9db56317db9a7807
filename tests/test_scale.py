"""Running at scale on CPU ranks: one optimizer step of the training pass at TP x DP, PP x DP, TP + sequence
parallelism, with the distributed optimizer and with activation recompute, against the same step in one process
(loss, gradient norm and updated weights within 1e-5); a checkpoint written at DP=2 and resumed at DP=1; ranks
that agree to skip a step; and layouts that cannot run, each with its own error.

Each data-parallel rank trains its own rows of the step's rollouts (rank d: rows d, d + DP, ...), with the
weights normalised by the global counts, so the step is the single-process step over all rows. Adam's eps is
1e-4, so the first step (which is ~lr * sign(g)) does not amplify float noise in tiny gradients.
"""

from __future__ import annotations

import pytest
import torch

from megatron_xopd.algo import CROSS_MODAL, IN_MODAL, XOPDConfig
from megatron_xopd.testing import run_distributed
from tests._models import VOCAB
from tests.test_trainer_passes import _models, _rollouts

LR = 1e-3


def _train_steps(steps: int = 1, micro_batch_size: int = 2, layout: dict | None = None,
                 recompute: dict | None = None, save_to: str | None = None, load_from: str | None = None):
    """``steps`` optimizer steps on the fixed rollouts under ``layout`` (re-initialising megatron's groups);
    returns (global loss, grad norm) of the last step and the full weights after it."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_xopd.algo import LossStats, rollout_weights
    from megatron_xopd.models import RecomputeConfig, gather_canonical_state_dict
    from megatron_xopd.runtime import ParallelConfig, initialize_model_parallel
    from megatron_xopd.runtime.reduce import reduce_over_replicas
    from megatron_xopd.trainer.build import build_optimizer, wrap_ddp
    from megatron_xopd.trainer.checkpoint import load_checkpoint, save_checkpoint
    from megatron_xopd.trainer.config import OptimSection
    from megatron_xopd.trainer.passes import score_with_teacher, train_pass

    layout = ParallelConfig(**(layout or {}))
    initialize_model_parallel(layout)
    student, teacher = _models(False, layout.sequence_parallel, RecomputeConfig(**(recompute or {})))
    r = _rollouts(student)
    cfg = XOPDConfig(lam=0.5, loss="sampled_token", responses="on_policy")
    ddp = wrap_ddp(student, layout)
    optimizer, _ = build_optimizer(ddp, OptimSection(lr=LR, adam_eps=1e-4, clip_grad=0.0), max_steps=10)
    if load_from:
        load_checkpoint(load_from, student, optimizer)
    score_with_teacher(teacher, r, micro_batch_size, VOCAB, cfg)
    counts = {m: float((r.modality == m).sum()) for m in (IN_MODAL, CROSS_MODAL)}
    tokens = {m: float(r.lengths[r.modality == m].sum()) for m in (IN_MODAL, CROSS_MODAL)}
    r.weights = rollout_weights(r.lengths, r.modality, cfg, global_rollouts=counts, global_tokens=tokens)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows = torch.arange(len(r))[dp_rank::dp]
    for _ in range(steps):
        stats = LossStats()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        train_pass(ddp, r, rows, cfg, micro_batch_size, VOCAB, stats)
        updated, grad_norm, _ = optimizer.step()
        assert updated
    if save_to:
        save_checkpoint(save_to, steps, student, optimizer, {})
    loss = reduce_over_replicas({"loss": stats.loss})["loss"]
    weights = gather_canonical_state_dict(student.language_model, VOCAB + 1)
    dist.barrier()
    return loss, float(grad_norm), weights


def _runs(runs: list[dict]) -> list:
    """Several :func:`_train_steps` in one set of processes (megatron-core's import dominates a spawn)."""
    return [_train_steps(**run) for run in runs]


def _assert_same_step(result, reference, name=""):
    loss, grad_norm, weights = result
    ref_loss, ref_norm, ref_weights = reference
    assert loss == pytest.approx(ref_loss, abs=1e-5, rel=1e-5), name
    assert grad_norm == pytest.approx(ref_norm, abs=1e-5, rel=1e-5), name
    assert weights.keys() == ref_weights.keys()
    for key in ref_weights:
        torch.testing.assert_close(weights[key], ref_weights[key], atol=1e-5, rtol=0, msg=f"{name}: {key}")


RECOMPUTE = {"selective": {"granularity": "selective"}, "full": {"granularity": "full", "method": "uniform",
                                                                  "num_layers": 2}}


@pytest.fixture(scope="module")
def single_process():
    """The reference step (no recompute), then the same step with each kind of recompute, in one process."""
    runs = [{}] + [{"recompute": rc} for rc in RECOMPUTE.values()]
    results = run_distributed(_runs, 1, runs)[0]
    reference = results[0]
    assert reference[1] > 0
    return reference, dict(zip(RECOMPUTE, results[1:]))


LAYOUTS = {
    "tp2xdp2": {"tensor_model_parallel_size": 2},
    "tp2xdp2+distributed-optimizer": {"tensor_model_parallel_size": 2, "use_distributed_optimizer": True,
                                      "overlap_grad_reduce": True},
    "pp2xdp2": {"pipeline_model_parallel_size": 2},
    "tp2+sp x dp2": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
}


@pytest.mark.parity
@pytest.mark.slow
def test_a_step_at_scale_equals_the_single_process_step(single_process):
    """4 ranks: TP2xDP2, the same with the distributed optimizer (overlapped gradient reduction), PP2xDP2 (two
    micro-batches per rank) and TP2 with sequence parallelism x DP2."""
    reference, _ = single_process
    runs = [{"layout": layout, "micro_batch_size": 1 if "pipeline_model_parallel_size" in layout else 2}
            for layout in LAYOUTS.values()]
    per_rank = run_distributed(_runs, 4, runs)
    for i, name in enumerate(LAYOUTS):
        for rank, results in enumerate(per_rank):  # every rank ends with the same full weights
            _assert_same_step(results[i], reference, f"{name} rank {rank}")


@pytest.mark.parity
@pytest.mark.parametrize("kind", list(RECOMPUTE))
def test_activation_recompute_equals_no_recompute(single_process, kind):
    reference, recomputed = single_process
    _assert_same_step(recomputed[kind], reference, kind)
