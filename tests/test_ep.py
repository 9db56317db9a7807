"""Expert parallelism across data-parallel ranks with different inputs (issue 12): an X-OPD training step with a
tiny MoE student LLM and MoE teacher at EP=2 (DP=2) equals the step at EP=1 (DP=2), also when one rank trains on
fewer rows (fewer micro-batches) and scores with a different micro-batch count; rollouts at EP=2 equal those at
EP=1 token for token, also when the ranks' prompts differ in length and one rank stops early on a stop id.

At EP=2 every MoE forward runs an all-to-all over both ranks, so these runs hang (and hit run_distributed's
timeout) unless the ranks make the same number of forward calls. Weights are drawn from a seed in the canonical
(unsharded) form and loaded into each layout, so both layouts hold the same model.
"""

from __future__ import annotations

import pytest
import torch

from megatron_xopd.algo import CROSS_MODAL, IN_MODAL, XOPDConfig
from megatron_xopd.testing import run_distributed
from tests._models import VOCAB, tiny_gpt_config, tiny_perception_config

LR = 1e-3
TIMEOUT_S = 300


def _moe_config(**overrides):
    return tiny_gpt_config("qwen3", num_layers=2, hidden_size=32, ffn_hidden_size=48, num_moe_experts=4,
                           moe_ffn_hidden_size=16, moe_router_topk=2, padded_vocab_size=512, **overrides)


def _randomize(model: torch.nn.Module, vocab: int, seed: int) -> None:
    """Seeded random canonical weights (the same at every layout) loaded into ``model``; router weights are
    large so that top-k routing has clear winners (no float near-ties between layouts)."""
    from megatron_xopd.models import gather_canonical_state_dict, load_canonical_state_dict

    full = gather_canonical_state_dict(model, vocab)
    g = torch.Generator().manual_seed(seed)
    new = {}
    for key in sorted(full):
        noise = torch.randn(full[key].shape, generator=g)
        if "norm" in key:
            new[key] = 1 + 0.1 * noise
        elif "router" in key:
            new[key] = noise
        else:
            new[key] = (0.5 if "embedding" in key else 0.1) * noise
    load_canonical_state_dict(model, new)


def _models():
    from megatron_xopd.models import SpeechStudent, build_teacher
    from megatron_xopd.runtime import set_seed

    set_seed(0)
    student_cfg = _moe_config(vocab_size=VOCAB + 1, text_vocab_size=VOCAB)
    teacher_cfg = _moe_config()
    student = SpeechStudent(student_cfg, tiny_perception_config(), VOCAB)
    _randomize(student.language_model, VOCAB + 1, seed=1)
    teacher = build_teacher(teacher_cfg, student_cfg)
    _randomize(teacher, VOCAB, seed=2)
    with torch.no_grad():
        student.perception.proj.weight.copy_(torch.randn(32, 16, generator=torch.Generator().manual_seed(3)) * 0.3)
        student.perception.proj.bias.zero_()
    return student, teacher


def _train_step(ep: int, rows_per_rank: list[list[int]], teacher_mbs: list[int]):
    """One optimizer step at EP=``ep`` x DP=2: rank d trains ``rows_per_rank[d]`` (micro-batches of 1) after
    scoring all rollouts in micro-batches of ``teacher_mbs[d]``; returns (loss, grad norm, full weights,
    teacher log-probs)."""
    import torch.distributed as dist

    from megatron_xopd.algo import LossStats, rollout_weights
    from megatron_xopd.models import gather_canonical_state_dict
    from megatron_xopd.runtime import ParallelConfig, initialize_model_parallel
    from megatron_xopd.runtime.reduce import reduce_over_replicas
    from megatron_xopd.trainer.build import build_optimizer, wrap_ddp
    from megatron_xopd.trainer.config import OptimSection
    from megatron_xopd.trainer.passes import score_with_teacher, train_pass
    from tests.test_trainer_passes import _rollouts

    layout = ParallelConfig(expert_model_parallel_size=ep)
    initialize_model_parallel(layout)
    student, teacher = _models()
    r = _rollouts(student)
    cfg = XOPDConfig(lam=0.5, loss="sampled_token", responses="on_policy")
    ddp = wrap_ddp(student, layout)
    optimizer, _ = build_optimizer(ddp, OptimSection(lr=LR, adam_eps=1e-4, clip_grad=0.0), max_steps=10)
    rank = dist.get_rank()
    score_with_teacher(teacher, r, teacher_mbs[rank], VOCAB, cfg)
    counts = {m: float((r.modality == m).sum()) for m in (IN_MODAL, CROSS_MODAL)}
    tokens = {m: float(r.lengths[r.modality == m].sum()) for m in (IN_MODAL, CROSS_MODAL)}
    r.weights = rollout_weights(r.lengths, r.modality, cfg, global_rollouts=counts, global_tokens=tokens)
    stats = LossStats()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    train_pass(ddp, r, torch.tensor(rows_per_rank[rank]), cfg, 1, VOCAB, stats)
    updated, grad_norm, _ = optimizer.step()
    assert updated
    loss = reduce_over_replicas({"loss": stats.loss})["loss"]
    weights = gather_canonical_state_dict(student.language_model, VOCAB + 1)
    dist.barrier()
    return loss, float(grad_norm), weights, r.teacher_logprobs.clone()


def _train_runs(runs: list[dict]) -> list:
    return [_train_step(**run) for run in runs]


EVEN = {"rows_per_rank": [[0, 2], [1, 3]], "teacher_mbs": [2, 2]}
UNEVEN = {"rows_per_rank": [[0, 1, 2], [3]], "teacher_mbs": [1, 2]}  # 3 vs 1 and 4 vs 2 micro-batches


def _assert_same_step(result, reference, name):
    loss, grad_norm, weights, teacher_lp = result
    ref_loss, ref_norm, ref_weights, ref_teacher_lp = reference
    assert loss == pytest.approx(ref_loss, abs=1e-5, rel=1e-5), name
    assert grad_norm == pytest.approx(ref_norm, abs=1e-5, rel=1e-5), name
    torch.testing.assert_close(teacher_lp, ref_teacher_lp, atol=1e-5, rtol=0, msg=name)
    assert weights.keys() == ref_weights.keys()
    for key in ref_weights:
        torch.testing.assert_close(weights[key], ref_weights[key], atol=1e-5, rtol=0, msg=f"{name}: {key}")


@pytest.mark.parity
@pytest.mark.slow
def test_an_xopd_step_at_ep2_equals_ep1_also_with_uneven_rows_per_rank():
    runs = [{"ep": ep, **split} for ep in (1, 2) for split in (EVEN, UNEVEN)]
    per_rank = run_distributed(_train_runs, 2, runs, timeout_s=TIMEOUT_S)
    for rank, (ep1_even, ep1_uneven, ep2_even, ep2_uneven) in enumerate(per_rank):
        assert ep1_even[1] > 0 and any(".mlp.experts." in k for k in ep1_even[2])
        _assert_same_step(ep2_even, ep1_even, f"EP2 even, rank {rank}")
        _assert_same_step(ep2_uneven, ep1_uneven, f"EP2 uneven, rank {rank}")
        _assert_same_step(ep1_uneven, ep1_even, f"EP1 uneven vs even, rank {rank}")  # the split is the same step


# ------------------------------------------------------------------------------------------------- rollouts

PROMPTS = [[[5, 6, 7], [9, 10, 11, 12, 13, 14, 15]], [[20, 21], [30, 31, 32, 33]]]  # per rank: lengths differ
MAX_NEW = 6


def _generate(ep: int, stop_first: bool) -> dict:
    """Greedy and sampled (n=2) generation at EP=``ep`` x DP=2, rank d on ``PROMPTS[d]``. With ``stop_first``
    rank 0 stops on the first token each of its rows drew without stop ids (read from an EP=1 run), so it is
    done after one step while rank 1 generates all ``MAX_NEW`` tokens."""
    import torch.distributed as dist

    from megatron_xopd.ops.sampling import SamplingParams

    rank = dist.get_rank()
    out = {}
    for name, kw in (("greedy", {"greedy": True}), ("sampled", {"temperature": 1.0, "n": 2, "seed": 7 + rank})):
        stops: tuple[int, ...] = ()
        if stop_first:
            first = _generate_once(1, PROMPTS[rank], SamplingParams(max_new_tokens=1, **kw))
            stops = tuple(sorted(set(first.tokens[:, 0].tolist()))) if rank == 0 else ()
        batch = _generate_once(ep, PROMPTS[rank], SamplingParams(max_new_tokens=MAX_NEW, stop_ids=stops, **kw))
        out[name] = {"tokens": batch.tokens, "lengths": batch.lengths, "finished": batch.finished,
                     "logprobs": batch.logprobs}
    return out


def _generate_once(ep: int, prompts, params):
    from megatron_xopd.models import build_gpt_model
    from megatron_xopd.rollout.engine import RolloutEngine
    from megatron_xopd.runtime import ParallelConfig, initialize_model_parallel, set_seed

    initialize_model_parallel(ParallelConfig(expert_model_parallel_size=ep))
    set_seed(0)
    model = build_gpt_model(_moe_config())
    _randomize(model, VOCAB, seed=2)
    return RolloutEngine(model, text_vocab_size=VOCAB).generate(prompts, params)


def _rollout_runs(runs: list[dict]) -> list:
    return [_generate(**run) for run in runs]


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("stop_first", [False, True], ids=["no-stop", "rank0-stops-early"])
def test_rollouts_at_ep2_equal_ep1(stop_first):
    per_rank = run_distributed(_rollout_runs, 2, [{"ep": 1, "stop_first": stop_first},
                                                  {"ep": 2, "stop_first": stop_first}], timeout_s=TIMEOUT_S)
    for rank, (ep1, ep2) in enumerate(per_rank):
        for name in ("greedy", "sampled"):
            for key in ("tokens", "lengths", "finished"):
                assert torch.equal(ep2[name][key], ep1[name][key]), (rank, name, key)
            torch.testing.assert_close(ep2[name]["logprobs"], ep1[name]["logprobs"], atol=1e-5, rtol=0)
            if stop_first:  # rank 0 is done after one step, rank 1 runs to max_new_tokens
                expect = 1 if rank == 0 else MAX_NEW
                assert ep1[name]["lengths"].tolist() == [expect] * len(ep1[name]["lengths"]), (rank, name)
                assert bool(ep1[name]["finished"].all()) == (rank == 0)
