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

from megatron_xopd.testing import run_distributed
from tests._steps import optimizer_steps
from tests.test_trainer_passes import _models


def _train_steps(steps: int = 1, micro_batch_size: int = 2, layout: dict | None = None,
                 recompute: dict | None = None, save_to: str | None = None, load_from: str | None = None):
    """``steps`` optimizer steps on the fixed rollouts under ``layout`` (re-initialising megatron's groups);
    returns (global loss, grad norm) of the last step, the full weights after it, and how many times megatron's
    activation checkpoint ran."""
    from megatron.core import tensor_parallel

    from megatron_xopd.models import RecomputeConfig
    from megatron_xopd.runtime import ParallelConfig, initialize_model_parallel

    layout = ParallelConfig(**(layout or {}))
    initialize_model_parallel(layout)
    recomputed = []  # megatron's recompute calls tensor_parallel.checkpoint: count them
    checkpoint = tensor_parallel.checkpoint
    tensor_parallel.checkpoint = lambda *args, **kwargs: recomputed.append(1) or checkpoint(*args, **kwargs)
    student, teacher = _models(False, layout.sequence_parallel, RecomputeConfig(**(recompute or {})))
    try:
        out, _ = optimizer_steps(layout, student, teacher, steps=steps, micro_batch_size=micro_batch_size,
                                 load_from=load_from, save_to=save_to)
    finally:
        tensor_parallel.checkpoint = checkpoint
    return (*out[-1], len(recomputed))


def _runs(runs: list[dict]) -> list:
    """Several :func:`_train_steps` in one set of processes (megatron-core's import dominates a spawn)."""
    return [_train_steps(**run) for run in runs]


def _assert_same_step(result, reference, name=""):
    loss, grad_norm, weights = result[:3]
    ref_loss, ref_norm, ref_weights = reference[:3]
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
    assert reference[1] > 0 and reference[3] == 0
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
    assert recomputed[kind][3] > 0  # megatron's checkpoint ran (per layer: selective the core attention, full the layers)
    _assert_same_step(recomputed[kind], reference, kind)


@pytest.mark.parity
@pytest.mark.slow
def test_a_checkpoint_saved_at_dp2_resumes_at_dp1_with_the_same_next_step(tmp_path):
    """Distributed optimizer (state sharded over DP): step 1 at DP=2 saved; step 2 after resuming at DP=1 equals
    step 2 of the uninterrupted DP=2 run (weights and the resharded Adam moments both enter step 2)."""
    layout = {"use_distributed_optimizer": True}
    _, uninterrupted = run_distributed(_runs, 2, [{"layout": layout, "save_to": str(tmp_path)},
                                                  {"layout": layout, "steps": 2}])[0]
    resumed = run_distributed(_runs, 1, [{"layout": layout, "load_from": str(tmp_path / "step_0000001")}])[0][0]
    _assert_same_step(resumed, uninterrupted, "DP2 -> DP1")


def test_layouts_that_cannot_run_give_one_clear_error_each():
    from megatron_xopd.runtime import ParallelConfig
    from tests._models import tiny_gpt_config

    model = ("model.student.llm", tiny_gpt_config())  # 4 layers, 4 heads, 2 query groups, ffn 96
    assert ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).problems(8, model) == []
    problems = ParallelConfig(tensor_model_parallel_size=4, pipeline_model_parallel_size=3).problems(8, model)
    assert problems == [
        "trainer.parallel: world size 8 is not divisible by tensor_model_parallel_size (4) x "
        "pipeline_model_parallel_size (3) x context_parallel_size (1)",
        "trainer.parallel: world size 8 is not divisible by expert_tensor_parallel_size (4) x "
        "expert_model_parallel_size (1) x pipeline_model_parallel_size (3)",
        "model.student.llm.num_query_groups (2) is not divisible by trainer.parallel.tensor_model_parallel_size (4)",
        "model.student.llm.num_layers (4) is not divisible by trainer.parallel.pipeline_model_parallel_size (3)",
    ]
    heads = ParallelConfig(tensor_model_parallel_size=8).problems(8, ("model.teacher.llm", tiny_gpt_config()))
    assert any(p.startswith("model.teacher.llm.num_attention_heads (4) is not divisible") for p in heads)
    moe = ("model.teacher.llm", tiny_gpt_config(num_moe_experts=6, moe_ffn_hidden_size=32))
    assert ParallelConfig(expert_model_parallel_size=4).problems(4, moe) == [
        "model.teacher.llm.num_moe_experts (6) is not divisible by trainer.parallel.expert_model_parallel_size (4)"]
    assert ParallelConfig(tensor_model_parallel_size=2).problems(2, moe) == [
        "model.teacher.llm is a mixture of experts: megatron-core needs trainer.parallel.sequence_parallel=true "
        "with tensor_model_parallel_size (2) > 1"]
    vpp = ParallelConfig(virtual_pipeline_model_parallel_size=2).problems(1, model)
    assert vpp == ["trainer.parallel.virtual_pipeline_model_parallel_size (2) needs pipeline_model_parallel_size > 1"]
    with pytest.raises(ValueError, match=r"(?s)parallel layout does not fit:.*num_query_groups.*num_layers"):
        ParallelConfig(tensor_model_parallel_size=4, pipeline_model_parallel_size=3).validate(12, model)


def test_the_trainer_the_converters_and_the_memory_plan_check_a_layout_by_the_same_rules():
    """runtime/parallel.py owns the rules: GPTModelConfig.validate_parallel (conversion) and the memory plan's
    validate_layout report what ParallelConfig.problems (the trainer) reports, each with its own key names."""
    from megatron_xopd.models import ModelConfigError
    from megatron_xopd.models.memory import Layout, LayoutError, validate_layout
    from megatron_xopd.runtime import ParallelConfig
    from tests._models import tiny_gpt_config

    moe = tiny_gpt_config(num_moe_experts=6, moe_ffn_hidden_size=32)
    etp3 = ParallelConfig(expert_tensor_parallel_size=3)
    assert etp3.problems(3, ("model.teacher.llm", moe)) == [
        "model.teacher.llm.moe_ffn_hidden_size (32) is not divisible by trainer.parallel.expert_tensor_parallel_size (3)"]
    with pytest.raises(ModelConfigError, match=r"^model\.moe_ffn_hidden_size \(32\) is not divisible by "
                                               r"expert_tensor_parallel_size \(3\)$"):
        moe.validate_parallel(1, 1, 1, 3)
    with pytest.raises(LayoutError, match=r"model\.teacher\.llm\.moe_ffn_hidden_size \(32\) is not divisible"):
        validate_layout(Layout(etp3, 3), {"model.teacher.llm": moe})
    # a dense FFN width only matters when a layer is dense: all-MoE models may leave it indivisible
    all_moe = tiny_gpt_config(num_moe_experts=4, moe_ffn_hidden_size=32, ffn_hidden_size=33)
    assert ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True).problems(2, ("m", all_moe)) == []
    all_moe.validate_parallel(2, 1)
    some_dense = tiny_gpt_config(num_moe_experts=4, moe_ffn_hidden_size=32, ffn_hidden_size=33, moe_layer_freq=2)
    with pytest.raises(ModelConfigError, match=r"model\.ffn_hidden_size \(33\) is not divisible"):
        some_dense.validate_parallel(2, 1)


def _train_own_manifest(configs: list[dict]):
    """The trainer with rank r reading ``configs[r]`` (its own manifest); returns the logged metrics, the
    skipped-step count and whether the student's weights changed."""
    import json
    from pathlib import Path

    import torch.distributed as dist

    from megatron_xopd.trainer import XOPDTrainer, to_run_config
    from tests._trainer_setup import snapshot

    run = to_run_config(configs[dist.get_rank()])
    trainer = XOPDTrainer(run)
    before = snapshot(trainer)
    trainer.train()
    after = snapshot(trainer)
    changed = any(not torch.equal(before["llm"][k], after["llm"][k]) for k in before["llm"])
    path = Path(run.logging.dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if dist.get_rank() == 0 else []
    return rows, trainer.skipped_steps, changed


@pytest.mark.parity
@pytest.mark.slow
def test_a_rank_whose_batch_is_all_bad_cuts_makes_every_rank_skip_the_step(tmp_path):
    """DP=2, speech prompts only (lam=0): every cut of rank 1 has more audio frames than the positions a prompt may
    take, so rank 1 has no usable prompt. Both ranks skip both steps (one all-reduce of "I have work"), count them,
    update nothing, and the run finishes instead of waiting in a collective."""
    from tests._trainer_setup import run_config, write_feature_cuts

    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    good = write_feature_cuts(tmp_path / "good")
    bad = write_feature_cuts(tmp_path / "bad", frames=300)  # > 256 positions - 6 new tokens
    configs = [run_config(tmp_path / "run", manifest, trainer={"max_steps": 2}, data={"prompts_per_step": 2},
                          xopd={"lam": 0.0}, checkpoint={"dir": None}) for manifest in (good, bad)]
    (rows, skipped0, changed0), (_, skipped1, changed1) = run_distributed(_train_own_manifest, 2, configs,
                                                                          timeout_s=400)
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["skipped_steps"] for r in rows] == [1, 2] and "loss" not in rows[0]
    assert skipped0 == skipped1 == 2
    assert not changed0 and not changed1
