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
from tests._steps import LR, optimizer_steps

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

    from megatron_xopd.runtime import ParallelConfig, initialize_model_parallel

    layout = ParallelConfig(expert_model_parallel_size=ep)
    initialize_model_parallel(layout)
    student, teacher = _models()
    rank = dist.get_rank()
    out, r = optimizer_steps(layout, student, teacher, micro_batch_size=1, teacher_micro_batch_size=teacher_mbs[rank],
                             rows=torch.tensor(rows_per_rank[rank]))
    return (*out[0], r.teacher_logprobs.clone())


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


# ------------------------------------------------------------------------ the training loop's other forwards
# Each of these hung at EP=2 before its fix; HANG_S makes a hang fail the test instead of blocking the suite.

HANG_S = 120
LOCATOR = VOCAB


class _StopIds:
    """The collector reads only the stop ids from its tokenizer: id 3 here."""

    eos_token_id = unk_token_id = None

    def get_vocab(self) -> dict[str, int]:
        return {"<|im_end|>": 3}  # the end-of-turn token (data/prompt_format.py looks it up by name)

    def convert_tokens_to_ids(self, token: str) -> int:
        return 3

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids)


def _token_score(response: str, reference: str) -> float:
    """A score that depends on every generated token (random models answer nothing right)."""
    return sum(int(t) for t in response.split()) % 89 / 89


def _batch(cuts: list[int], frames: int = 3) -> dict:
    """Paired prompts for ``cuts``: T ids and S ids (one audio locator) with ``frames`` feature frames each."""
    g = torch.Generator().manual_seed(100 + sum(cuts) + frames)
    return {"cut_ids": [f"cut{c}" for c in cuts],
            "text_prompt_ids": [[10 + c, 20 + c, 30 + c][: 2 + c % 2] for c in cuts],
            "speech_prompt_ids": [[1, LOCATOR, 2 + c] for c in cuts],
            "features": torch.randn(len(cuts), frames, 16, generator=g),
            "feature_lens": torch.full((len(cuts),), frames), "answers": [str(c) for c in cuts]}


def _collect(ep: int) -> dict:
    """Rollout collection at EP=``ep`` x DP=2 (rank d = data-parallel rank d), where one rank has (a) no batch,
    (a) only speech prompts too long for the rollout, then (b) only cut ids whose teacher answers are cached; then
    evaluation, rank 0 with more validation batches than rank 1."""
    import torch.distributed as dist

    from megatron_xopd.rollout import RolloutCollector, SamplingParams
    from megatron_xopd.runtime import ParallelConfig, initialize_model_parallel

    initialize_model_parallel(ParallelConfig(expert_model_parallel_size=ep))
    rank = dist.get_rank()
    student, teacher = _models()

    def collector(xopd: XOPDConfig) -> RolloutCollector:  # prompts longer than 20 - 4 positions are left out
        return RolloutCollector(student, teacher, _StopIds(), xopd=xopd, sampling=SamplingParams(max_new_tokens=4),
                                max_positions=20, text_vocab_size=VOCAB, audio_locator_id=LOCATOR, seed=5)

    on_policy = collector(XOPDConfig(lam=0.0, n_samples=2))  # speech prompts only
    out = {}
    no_batch = on_policy.collect(_batch([0, 1]) if rank == 0 else _batch([]), step=0)
    out["no_batch"] = (no_batch.rollouts is None, no_batch.anyone, len(no_batch.skipped))
    too_long = on_policy.collect(_batch([0, 1]) if rank == 0 else _batch([2], frames=30), step=1)
    out["too_long"] = (too_long.rollouts is None, too_long.anyone, len(too_long.skipped))
    usable = on_policy.collect(_batch([0, 1]) if rank == 0 else _batch([2, 3, 4]), step=2).rollouts
    out["usable"] = (usable.responses, usable.lengths, usable.old_logprobs)

    given = collector(XOPDConfig(lam=0.0, loss="sft", responses="teacher_greedy"))
    first = given.teacher_greedy_answers(_batch([10 * rank, 10 * rank + 1]))
    again = given.teacher_greedy_answers(_batch([0, 1]) if rank == 0 else _batch([12, 13, 14]))  # rank 0: cached
    out["teacher"] = (first, again)

    # evaluation: rank 0 has two validation batches, rank 1 one (DP ranks' shares of a validation set differ)
    from megatron_xopd.trainer.evaluate import evaluate

    validation = [_batch([40, 41]), _batch([42])] if rank == 0 else [_batch([50, 51, 52])]
    out["evaluate"] = evaluate(collector(XOPDConfig(lam=0.5)), validation, _token_score, max_new_tokens=4,
                               max_prompts=100, with_teacher=True)
    return out


def _collect_runs(eps: list[int]) -> list[dict]:
    return [_collect(ep) for ep in eps]


@pytest.mark.parity
def test_collection_and_evaluation_at_ep2_when_a_rank_has_no_prompt_cached_answers_or_fewer_batches():
    per_rank = run_distributed(_collect_runs, 2, [1, 2], timeout_s=HANG_S)
    for rank, (ep1, ep2) in enumerate(per_rank):
        # (a) a rank without a usable prompt: every rank skips the step, before generating
        assert ep2["no_batch"] == ep1["no_batch"] == (True, True, 0), rank
        assert ep2["too_long"] == ep1["too_long"] == (True, True, rank), rank  # rank 1's one speech prompt
        for got, want in zip(ep2["usable"], ep1["usable"]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert len(ep1["usable"][1]) == 2 * (2 if rank == 0 else 3)  # n=2 samples of each prompt
        # (b) the teacher's greedy answers: rank 0's second batch is cached, rank 1 still generates
        assert ep2["teacher"] == ep1["teacher"], rank
        first, again = ep1["teacher"]
        assert len(first) == 2 and len(again) == (2 if rank == 0 else 3) and all(first) and all(again)
        if rank == 0:
            assert again == first
        # evaluation with different numbers of validation batches per rank
        assert ep1["evaluate"]["eval/prompts"] == 6
        assert ep2["evaluate"] == pytest.approx(ep1["evaluate"], abs=1e-9), rank
        assert all(ep1["evaluate"][k] > 0 for k in ("eval/acc_text", "eval/acc_speech", "eval/acc_teacher_text"))


def _minibatch_steps(ep: int, minibatches: int) -> dict:
    """``xopd.minibatches`` optimizer steps at EP=``ep`` x DP=2 over rows [0, 1, 2] (rank 0) and [3] (rank 1):
    rank 1 has fewer rows than mini-batches. Returns the steps' grad norms and the updated weights."""
    import torch.distributed as dist

    from megatron_xopd.algo import LossStats, rollout_weights
    from megatron_xopd.models import gather_canonical_state_dict
    from megatron_xopd.runtime import ParallelConfig, initialize_model_parallel
    from megatron_xopd.trainer.build import build_optimizer, wrap_ddp
    from megatron_xopd.trainer.config import OptimSection
    from megatron_xopd.trainer.passes import minibatch_rows, score_with_teacher, train_pass
    from tests.test_trainer_passes import _rollouts

    layout = ParallelConfig(expert_model_parallel_size=ep)
    initialize_model_parallel(layout)
    student, teacher = _models()
    r = _rollouts(student)
    cfg = XOPDConfig(lam=0.5, loss="sampled_token", responses="on_policy", minibatches=minibatches)
    ddp = wrap_ddp(student, layout)
    optimizer, _ = build_optimizer(ddp, OptimSection(lr=LR, adam_eps=1e-4, clip_grad=0.0), max_steps=10)
    mine = torch.tensor([[0, 1, 2], [3]][dist.get_rank()])
    score_with_teacher(teacher, r, 2, VOCAB, cfg)
    counts = {m: float((r.modality == m).sum()) for m in (IN_MODAL, CROSS_MODAL)}
    tokens = {m: float(r.lengths[r.modality == m].sum()) for m in (IN_MODAL, CROSS_MODAL)}
    r.weights = rollout_weights(r.lengths, r.modality, cfg, global_rollouts=counts, global_tokens=tokens)
    splits = minibatch_rows(len(mine), minibatches)
    norms = []
    for split in splits:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        train_pass(ddp, r, mine[split], cfg, 1, VOCAB, LossStats(), minibatches=len(splits))
        updated, grad_norm, _ = optimizer.step()
        assert updated
        norms.append(float(grad_norm))
    return {"sizes": [len(s) for s in splits], "norms": norms,
            "weights": gather_canonical_state_dict(student.language_model, VOCAB + 1)}


def _minibatch_runs(runs: list[dict]) -> list[dict]:
    return [_minibatch_steps(**run) for run in runs]


@pytest.mark.parity
def test_more_minibatches_than_rows_on_a_rank_at_ep2_equals_ep1():
    per_rank = run_distributed(_minibatch_runs, 2, [{"ep": 1, "minibatches": 4}, {"ep": 2, "minibatches": 4}],
                               timeout_s=HANG_S)
    for rank, (ep1, ep2) in enumerate(per_rank):
        # 4 asked, but no rank has 4 rows: 3 steps on both ranks, rank 1's last two empty
        assert ep1["sizes"] == ep2["sizes"] == ([1, 1, 1] if rank == 0 else [1, 0, 0])
        assert len(ep1["norms"]) == 3 and all(n > 0 for n in ep1["norms"])
        assert ep2["norms"] == pytest.approx(ep1["norms"], abs=1e-5, rel=1e-5)
        for key in ep1["weights"]:
            torch.testing.assert_close(ep2["weights"][key], ep1["weights"][key], atol=1e-5, rtol=0, msg=key)
