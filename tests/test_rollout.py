"""Rollouts: KV-cached TP/PP generation against cache-free recomputation, sampling, log-probs, speech prompts.

One 2-rank spawn runs every parallel check (TP=1, TP=2, PP=2, the speech
student at TP=2 and PP=2) and returns its results; the tests below assert on them. The sampler's own
properties are checked in-process on a single shard.
"""

import math

import pytest
import torch

from megatron_xopd.ops.sampling import SamplingParams, row_keys, sample_vocab_parallel
from megatron_xopd.testing import run_distributed
from tests._models import VOCAB, tiny_gpt_config, tiny_perception_config

PROMPTS = [[5, 17, 42, 8, 99], [3, 250, 7], [11, 12, 13, 14, 15, 16, 17, 18]]
MAX_NEW = 8
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, greedy=True)
FILTERED = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.9, top_k=20, top_p=0.9, n=2, seed=7)
PLAIN = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.3, n=2, seed=11)
LOCATOR = VOCAB  # the student's added audio-locator token, just past the text vocabulary
MIXED = [[9], PROMPTS[2] * 3, PROMPTS[1]]  # very different lengths: 1, 24, 3
SPEECH_PROMPTS = [[1, 2, LOCATOR, 3], [5, 6, 7, 8, 9, 10]]  # speech (3 + 5 frames) and text (6) in one batch
SPEECH_FRAMES = 5


# ------------------------------------------------------------------------------------------------------
# Helpers run on the spawned ranks.
# ------------------------------------------------------------------------------------------------------


def _full_logits(model, ids, audio_embeds=None):
    """Cache-free forward, full-vocabulary (gathered) text logits [B, S, VOCAB]."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    kwargs = {} if audio_embeds is None else {"audio_embeds": audio_embeds}
    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(model(ids, pos, None, **kwargs))[..., :VOCAB]


def _greedy_reference(model, prompts, audio=None):
    """Greedy decoding by recomputing the whole sequence at every step, one prompt at a time."""
    out = []
    for i, prompt in enumerate(prompts):
        ids = list(prompt)
        for _ in range(MAX_NEW):
            emb = audio[i] if audio is not None and audio[i] is not None else None
            logits = _full_logits(model, torch.tensor([ids]), emb)[0, -1]
            ids.append(int(logits.argmax()))
        out.append(ids[len(prompt):])
    return torch.tensor(out)


def _teacher_forced_error(model, batch, audio_per_prompt=None):
    """Max |returned log-prob - log-prob from one teacher-forced forward over prompt + response|."""
    ids, _, _ = batch.sequences()
    emb = None
    if audio_per_prompt is not None:
        parts = [audio_per_prompt[int(p)] for p in batch.sample_to_prompt if audio_per_prompt[int(p)] is not None]
        emb = torch.cat(parts) if parts else None
    logp = torch.log_softmax(_full_logits(model, ids, emb).double(), dim=-1)
    err = 0.0
    for i in range(batch.tokens.shape[0]):
        start = int(batch.prompt_lengths[batch.sample_to_prompt[i]])
        for t in range(int(batch.lengths[i])):
            ref = logp[i, start + t - 1, batch.tokens[i, t]]
            err = max(err, abs(float(batch.logprobs[i, t]) - float(ref)))
    return err


def _ratio_with_trainer_op(model, batch):
    """max |p_theta / p_old - 1| with p_theta from the trainer's op (``vocab_parallel_logprobs`` on the
    teacher-forced vocab-parallel logits, text vocabulary only) and p_old the rollout's ``logprobs``."""
    try:
        from megatron_xopd.ops import vocab_parallel_logprobs

        ids, _, mask = batch.sequences()
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1]).expand(ids.shape[0], -1), None)  # [N, L, V/TP]
        rows, cols = mask[:, 1:].nonzero(as_tuple=True)  # logits at j predict the response token at j + 1
        new = vocab_parallel_logprobs(logits[rows, cols], ids[rows, cols + 1], vocab_size=VOCAB)
        old = batch.logprobs[torch.arange(batch.tokens.shape[1])[None] < batch.lengths[:, None]]
        return float(((new.double() - old.double()).exp() - 1).abs().max())
    except Exception as err:  # noqa: BLE001 - reported by its own test, the other checks go on
        return f"{type(err).__name__}: {err}"


def _mixed_lengths_and_stops(engine, model) -> dict:
    """Prompts of lengths 1, 24 and 3 whose rows stop at different steps: the batch's rows, each row generated
    alone, the recomputed references, and the (rows, width) of every forward of the batch when finished rows
    leave it at once (``sync_every=1``)."""
    from megatron_xopd.rollout import RolloutEngine

    full = engine.generate(MIXED, GREEDY).tokens
    stops = (int(full[0, 2]), int(full[1, 5]))
    params = SamplingParams(max_new_tokens=MAX_NEW, greedy=True, stop_ids=stops)
    batch = engine.generate(MIXED, params)
    alone = [engine.generate([prompt], params) for prompt in MIXED]
    every_step = RolloutEngine(model, VOCAB, sync_every=1)  # finished rows leave the batch at once
    calls = []
    forward = every_step._forward
    every_step._forward = lambda wrapper, ids, start, audio: calls.append(tuple(ids.shape)) or forward(wrapper, ids, start, audio)
    at_once = every_step.generate(MIXED, params)
    return {"stops": stops, "batch": _summary(batch), "at_once": _summary(at_once), "calls": calls,
            "full_reference": _greedy_reference(model, MIXED),
            "alone_tokens": [a.tokens[0] for a in alone], "alone_logprobs": [a.logprobs[0] for a in alone]}


def _summary(batch):
    return {k: getattr(batch, k) for k in ("tokens", "lengths", "logprobs", "sampling_logprobs", "finished",
                                          "prompt_ids", "prompt_lengths", "sample_to_prompt", "audio_frames")}


def _text_suite(model, with_references: bool) -> dict:
    from megatron_xopd.rollout import RolloutEngine

    engine = RolloutEngine(model, VOCAB, sync_every=3)  # rows are checked for being done every 3 steps
    model.train()
    res = {}
    greedy = engine.generate(PROMPTS, GREEDY)
    res["train_mode_restored"] = model.training and all(m.training for m in model.modules())
    res["cache_released"] = engine.context is None
    res["greedy"] = _summary(greedy)
    res["filtered"] = _summary(engine.generate(PROMPTS, FILTERED))
    res["plain"] = _summary(engine.generate(PROMPTS, PLAIN))
    if with_references:
        res["greedy_nocache"] = _summary(engine.generate(PROMPTS, GREEDY, use_cache=False))
        res["greedy_reference"] = _greedy_reference(model, PROMPTS)
        res["filtered_again"] = _summary(engine.generate(PROMPTS, FILTERED))
        res["filtered_other_seed"] = _summary(engine.generate(PROMPTS, SamplingParams(**{**FILTERED.__dict__, "seed": 8})))
        res["lp_err_greedy"] = _teacher_forced_error(model, greedy)
        res["lp_err_filtered"] = _teacher_forced_error(model, engine.generate(PROMPTS, FILTERED))
        res["lp_err_plain"] = _teacher_forced_error(model, engine.generate(PROMPTS, PLAIN))
        # EOS: a token of prompt 0's greedy response that another response lacks; each row stops at its own
        # first occurrence of it.
        stop = next(int(t) for t in greedy.tokens[0, 1:] if not all(t in row for row in greedy.tokens[1:]))
        res["eos_id"] = stop
        res["eos"] = _summary(engine.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, greedy=True, stop_ids=(stop,))))
        res["mixed"] = _mixed_lengths_and_stops(engine, model)
        # Live weights: after an optimizer step the engine decodes with the updated parameters (no copy).
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        ids, _, _ = greedy.sequences()
        logits = model(ids, torch.arange(ids.shape[1]).expand(ids.shape[0], -1), None)
        (-torch.log_softmax(logits[..., :VOCAB], -1)[..., 7].mean()).backward()  # pull every position to token 7
        optimizer.step()
        res["after_step"] = engine.generate(PROMPTS, GREEDY).tokens
        res["after_step_reference"] = _greedy_reference(model, PROMPTS)
    return res


def _speech_student(llm_weights=None, perception_weights=None):
    from megatron_xopd.models import SpeechStudent, load_canonical_state_dict

    cfg = tiny_gpt_config(vocab_size=VOCAB + 1, text_vocab_size=VOCAB)
    student = SpeechStudent(cfg, tiny_perception_config(), audio_locator_id=LOCATOR)
    if llm_weights is not None:
        load_canonical_state_dict(student.language_model, llm_weights)
    if perception_weights is not None and student.perception is not None:
        student.perception.load_state_dict(perception_weights)
    return student


def _speech_suite(student, with_references: bool) -> dict:
    from megatron_xopd.models import expand_audio_locators
    from megatron_xopd.rollout import RolloutEngine

    features = torch.randn(1, SPEECH_FRAMES, 16, generator=torch.Generator().manual_seed(3))
    lens = torch.tensor([SPEECH_FRAMES])
    engine = RolloutEngine(student)
    res = {
        "greedy": _summary(engine.generate(SPEECH_PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, greedy=True, n=2),
                                           audio=features, audio_lens=lens)),
        "filtered": _summary(engine.generate(SPEECH_PROMPTS, FILTERED, audio=features, audio_lens=lens)),
    }
    if with_references:
        with torch.no_grad():
            emb = student.embed_audio(features, lens)[0]
        expanded = [expand_audio_locators(SPEECH_PROMPTS[0], len(emb), LOCATOR), SPEECH_PROMPTS[1]]
        res["greedy_reference"] = _greedy_reference(student, expanded, audio=[emb, None])
        res["lp_err_filtered"] = _teacher_forced_error(
            student, engine.generate(SPEECH_PROMPTS, FILTERED, audio=features, audio_lens=lens), [emb, None])
    return res


def _rollout_checks() -> dict:
    from megatron.core import parallel_state

    from megatron_xopd.models import build_gpt_model, gather_canonical_state_dict, load_canonical_state_dict
    from megatron_xopd.rollout import RolloutEngine
    from megatron_xopd.runtime import ParallelConfig, initialize_model_parallel, set_seed

    cfg = tiny_gpt_config()
    out: dict = {}

    # TP=1 (DP=2): the reference, with cache-free recomputation and teacher-forced log-probs.
    initialize_model_parallel(ParallelConfig())
    set_seed(0)
    model = build_gpt_model(cfg)
    weights = {k: v.clone() for k, v in gather_canonical_state_dict(model, VOCAB).items()}  # TP=1: views otherwise
    out["tp1"] = _text_suite(model, with_references=True)
    # a 3-layer model, which PP=2 splits only unevenly (the PP=2 section at the end)
    set_seed(0)
    uneven = build_gpt_model(tiny_gpt_config(num_layers=3))
    uneven_weights = {k: v.clone() for k, v in gather_canonical_state_dict(uneven, VOCAB).items()}
    out["uneven_reference"] = {name: _summary(RolloutEngine(uneven, VOCAB).generate(PROMPTS, params))
                               for name, params in (("greedy", GREEDY), ("plain", PLAIN))}

    # TP=2 on the same weights.
    initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=2))
    set_seed(0)
    model = build_gpt_model(cfg)
    load_canonical_state_dict(model, weights)
    out["tp2"] = _text_suite(model, with_references=False)
    mixed_params = SamplingParams(max_new_tokens=MAX_NEW, greedy=True, stop_ids=out["tp1"]["mixed"]["stops"])
    out["tp2"]["mixed"] = _summary(RolloutEngine(model, VOCAB).generate(MIXED, mixed_params))
    filtered = RolloutEngine(model, VOCAB).generate(PROMPTS, FILTERED)
    out["tp2"]["lp_err_filtered"] = _teacher_forced_error(model, filtered)
    out["tp2"]["ratio_err"] = _ratio_with_trainer_op(model, filtered)

    # The speech student at TP=2: a speech prompt and a text prompt in one batch.
    set_seed(0)
    student = _speech_student()
    student_llm = gather_canonical_state_dict(student.language_model, VOCAB + 1)
    student_perception = {k: v.clone() for k, v in student.perception.state_dict().items()}
    out["speech_tp2"] = _speech_suite(student, with_references=True)

    # PP=2 on the same weights (text model and speech student).
    initialize_model_parallel(ParallelConfig(pipeline_model_parallel_size=2))
    set_seed(0)
    model = build_gpt_model(cfg)
    load_canonical_state_dict(model, weights)
    out["pp2"] = _text_suite(model, with_references=False)
    out["pp2"]["mixed"] = _summary(RolloutEngine(model, VOCAB).generate(MIXED, mixed_params))
    sequential = RolloutEngine(model, VOCAB, pipelined=False)  # every stage in turn, megatron's pipeline forward
    out["pp2_sequential"] = {name: _summary(sequential.generate(PROMPTS, params))
                             for name, params in (("greedy", GREEDY), ("filtered", FILTERED), ("plain", PLAIN))}
    out["pp2_sequential"]["mixed"] = _summary(sequential.generate(MIXED, mixed_params))
    out["speech_pp2"] = _speech_suite(_speech_student(student_llm, student_perception), with_references=False)
    out["pp_rank"] = parallel_state.get_pipeline_model_parallel_rank()

    # The 3-layer model at PP=2 with the loss counted as a layer: 2 + 1 layers, the pipelined decode.
    initialize_model_parallel(ParallelConfig(pipeline_model_parallel_size=2, account_for_loss_in_pipeline_split=True))
    set_seed(0)
    uneven = build_gpt_model(tiny_gpt_config(num_layers=3))
    load_canonical_state_dict(uneven, uneven_weights)
    out["uneven_pp2"] = {name: _summary(RolloutEngine(uneven, VOCAB).generate(PROMPTS, params))
                         for name, params in (("greedy", GREEDY), ("plain", PLAIN))}
    out["uneven_pp2_layers"] = [layer.layer_number for layer in uneven.decoder.layers]  # 1-based, global
    return out


def _pipelined_checks() -> dict:
    """4 ranks: the pipelined decode at TP=2 x PP=2 against each rank's own single-process rollouts (DP=4), and
    the MoE model of tests/test_ep.py at PP=2 x EP=2 against EP=1 (the two pipelines hold different prompts; the
    one at data-parallel rank 0 stops after its first token while the other generates all its tokens)."""
    from megatron.core import parallel_state

    from megatron_xopd.models import build_gpt_model, gather_canonical_state_dict, load_canonical_state_dict
    from megatron_xopd.rollout import RolloutEngine
    from megatron_xopd.runtime import ParallelConfig, initialize_model_parallel, set_seed
    from tests.test_ep import MAX_NEW as EP_NEW, PROMPTS as EP_PROMPTS, _moe_config, _randomize

    cases = {"greedy": GREEDY, "filtered": FILTERED, "plain": PLAIN}
    out: dict = {}
    initialize_model_parallel(ParallelConfig())
    set_seed(0)
    model = build_gpt_model(tiny_gpt_config())
    weights = {k: v.clone() for k, v in gather_canonical_state_dict(model, VOCAB).items()}
    out["reference"] = {name: _summary(RolloutEngine(model, VOCAB).generate(PROMPTS, p)) for name, p in cases.items()}
    set_seed(0)
    moe = build_gpt_model(_moe_config())
    _randomize(moe, VOCAB, seed=2)
    first = RolloutEngine(moe, VOCAB).generate(EP_PROMPTS[0], SamplingParams(max_new_tokens=1, greedy=True))
    moe_cases = [SamplingParams(max_new_tokens=EP_NEW, greedy=True, stop_ids=tuple(first.tokens[:, 0].tolist())),
                 SamplingParams(max_new_tokens=EP_NEW, temperature=1.0, n=2, seed=7)]
    out["moe_reference"] = [[_summary(RolloutEngine(moe, VOCAB).generate(prompts, p)) for p in moe_cases]
                            for prompts in EP_PROMPTS]

    initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
    set_seed(0)
    model = build_gpt_model(tiny_gpt_config())
    load_canonical_state_dict(model, weights)
    out["tp2pp2"] = {name: _summary(RolloutEngine(model, VOCAB).generate(PROMPTS, p)) for name, p in cases.items()}

    initialize_model_parallel(ParallelConfig(pipeline_model_parallel_size=2, expert_model_parallel_size=2))
    dp = parallel_state.get_data_parallel_rank()
    set_seed(0)
    moe = build_gpt_model(_moe_config())
    _randomize(moe, VOCAB, seed=2)
    engine = RolloutEngine(moe, VOCAB)
    out["moe_dp"] = dp
    out["pp2ep2"] = [_summary(engine.generate(EP_PROMPTS[dp], p)) for p in moe_cases]
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_rollout_checks, 2)


# ------------------------------------------------------------------------------------------------------
# Parallel checks.
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parity
def test_greedy_cache_equals_recompute_and_tp2_and_pp2(results):
    ref = results[0]["tp1"]["greedy_reference"]
    assert ref.shape == (3, MAX_NEW)
    for rank in results:
        assert torch.equal(rank["tp1"]["greedy"]["tokens"], ref)
        assert torch.equal(rank["tp1"]["greedy_nocache"]["tokens"], ref)
        assert torch.equal(rank["tp2"]["greedy"]["tokens"], ref)  # identical on both TP ranks
        assert torch.equal(rank["pp2"]["greedy"]["tokens"], ref)  # identical on both stages
        for layout in ("tp1", "tp2", "pp2"):
            torch.testing.assert_close(rank[layout]["greedy"]["logprobs"], results[0]["tp1"]["greedy"]["logprobs"],
                                       atol=1e-5, rtol=0)
    assert [r["pp_rank"] for r in results] == [0, 1]


@pytest.mark.parity
def test_pipelined_decode_of_an_uneven_pp2_split_equals_single_process(results):
    """3 layers at PP=2 (``account_for_loss_in_pipeline_split``: layers 1-2 on the first stage, 3 on the last, which
    also holds the output layer and the sampler): the same tokens and log-probs as one process."""
    assert [r["uneven_pp2_layers"] for r in results] == [[1, 2], [3]]
    for rank in results:
        for name in ("greedy", "plain"):
            _assert_same_rollouts(rank["uneven_pp2"][name], rank["uneven_reference"][name], ("uneven pp2", name))


@pytest.mark.parity
def test_pipelined_decode_at_pp2_equals_the_sequential_one(results):
    for rank in results:  # the pipelined decode (the default) against every stage in turn, on both stages
        for name in ("greedy", "filtered", "plain", "mixed"):
            _assert_same_rollouts(rank["pp2"][name], rank["pp2_sequential"][name], ("pp2", name))


@pytest.mark.parity
def test_sampling_reproducible_and_layout_independent(results):
    tp1 = results[0]["tp1"]
    for name in ("filtered", "plain"):
        assert tp1[name]["tokens"].shape[0] == 6 and tp1[name]["sample_to_prompt"].tolist() == [0, 0, 1, 1, 2, 2]
        for rank in results:
            for layout in ("tp1", "tp2", "pp2"):
                assert torch.equal(rank[layout][name]["tokens"], tp1[name]["tokens"]), (layout, name)
                torch.testing.assert_close(rank[layout][name]["sampling_logprobs"], tp1[name]["sampling_logprobs"],
                                           atol=1e-5, rtol=0)
    assert torch.equal(tp1["filtered_again"]["tokens"], tp1["filtered"]["tokens"])
    assert not torch.equal(tp1["filtered_other_seed"]["tokens"], tp1["filtered"]["tokens"])
    # The n samples of a prompt share its prefill but are drawn independently.
    assert any(not torch.equal(tp1["plain"]["tokens"][2 * i], tp1["plain"]["tokens"][2 * i + 1]) for i in range(3))
    # Filtered sampling: the sampled distribution is narrower than the model's, never wider.
    f = tp1["filtered"]
    assert bool((f["sampling_logprobs"] >= f["logprobs"] - 1e-5).all())


@pytest.mark.parity
def test_logprobs_equal_teacher_forced_forward(results):
    tp1 = results[0]["tp1"]
    for key in ("lp_err_greedy", "lp_err_filtered", "lp_err_plain"):
        assert tp1[key] < 1e-4, (key, tp1[key])
    assert results[0]["tp2"]["lp_err_filtered"] < 1e-4
    assert results[0]["speech_tp2"]["lp_err_filtered"] < 1e-4


@pytest.mark.parity
def test_importance_ratio_starts_at_one_with_the_trainers_logprob_op_tp2(results):
    for rank in results:
        err = rank["tp2"]["ratio_err"]
        assert not isinstance(err, str), err
        assert err < 1e-4


@pytest.mark.parity
def test_eos_stops_each_sequence_on_its_own(results):
    tp1 = results[0]["tp1"]
    full, eos, stop = tp1["greedy"]["tokens"], tp1["eos"], tp1["eos_id"]
    for row in range(full.shape[0]):
        hits = (full[row] == stop).nonzero()
        expect = int(hits[0]) + 1 if hits.numel() else MAX_NEW
        assert int(eos["lengths"][row]) == expect
        assert bool(eos["finished"][row]) == bool(hits.numel())
        assert torch.equal(eos["tokens"][row, :expect], full[row, :expect])
        assert bool((eos["tokens"][row, expect:] == 0).all()) and bool((eos["logprobs"][row, expect:] == 0).all())
    assert bool(eos["finished"][0]) and len(set(eos["lengths"].tolist())) > 1


@pytest.mark.parity
def test_mixed_prompt_lengths_decode_together_and_stopped_rows_leave_the_batch(results):
    mixed = results[0]["tp1"]["mixed"]
    batch, stops, ref = mixed["batch"], mixed["stops"], mixed["full_reference"]
    lengths = batch["lengths"].tolist()
    for row in range(len(MIXED)):
        hits = [t for t in range(MAX_NEW) if int(ref[row, t]) in stops]
        expect = hits[0] + 1 if hits else MAX_NEW
        assert lengths[row] == expect and bool(batch["finished"][row]) == bool(hits), row
        assert torch.equal(batch["tokens"][row, :expect], ref[row, :expect]), row
        assert torch.equal(mixed["alone_tokens"][row], batch["tokens"][row, :expect]), row
        torch.testing.assert_close(mixed["alone_logprobs"][row], batch["logprobs"][row, :expect], atol=1e-5, rtol=0)
    assert len(set(lengths)) == 3, lengths  # the three rows stop at three different steps
    # One prefill of the longest prompt for all rows, then one-token forwards of the rows still generating only:
    # max(lengths) - 1 decode forwards, not (24 - 1) more for the tails of the longer prompts.
    for rank in results:  # the same at TP=2 and on both pipeline stages
        for layout in ("tp2", "pp2"):
            assert torch.equal(rank[layout]["mixed"]["tokens"], batch["tokens"]), layout
            assert torch.equal(rank[layout]["mixed"]["lengths"], batch["lengths"]), layout
    _assert_same_rollouts(mixed["at_once"], batch, "mixed: done rows checked every step and every 3 steps")
    calls = mixed["calls"]
    assert calls[0] == (len(MIXED), max(len(p) for p in MIXED))
    assert calls[1:] == [(sum(n > step for n in lengths), 1) for step in range(1, max(lengths))], (calls, lengths)


@pytest.mark.parity
def test_speech_and_text_prompts_in_one_batch(results):
    tp2 = results[0]["speech_tp2"]
    ref = tp2["greedy_reference"]
    for rank in results:
        for layout in ("speech_tp2", "speech_pp2"):
            greedy = rank[layout]["greedy"]
            assert greedy["prompt_lengths"].tolist() == [3 + SPEECH_FRAMES, 6]
            assert greedy["audio_frames"].tolist() == [SPEECH_FRAMES, 0]
            assert torch.equal(greedy["tokens"], ref.repeat_interleave(2, dim=0)), layout
            assert torch.equal(rank[layout]["filtered"]["tokens"], tp2["filtered"]["tokens"]), layout
    assert int((results[0]["speech_tp2"]["greedy"]["tokens"] >= VOCAB).sum()) == 0


@pytest.mark.parity
def test_rollouts_restore_training_mode_release_cache_and_follow_live_weights(results):
    for rank in results:
        for layout in ("tp1", "tp2", "pp2"):
            assert rank[layout]["train_mode_restored"] and rank[layout]["cache_released"]
    tp1 = results[0]["tp1"]
    assert torch.equal(tp1["after_step"], tp1["after_step_reference"])
    assert not torch.equal(tp1["after_step"], tp1["greedy"]["tokens"])


# ------------------------------------------------------------------------------------------------------
# The sampler on one shard (no process group).
# ------------------------------------------------------------------------------------------------------


def _keys(n, seed=0, step=0):
    return row_keys(seed, torch.arange(n), torch.full((n,), step))


def test_sampler_greedy_topk_topp_and_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 12, generator=g) * 2
    logits[:, 10:] = 50.0  # padding / added tokens: never sampled, whatever their logits
    lp_full = torch.log_softmax(logits[:, :10], dim=-1)

    greedy = sample_vocab_parallel(logits, SamplingParams(greedy=True), _keys(4000), text_vocab_size=10)
    assert torch.equal(greedy.tokens, logits[:, :10].argmax(1))
    torch.testing.assert_close(greedy.logprobs, lp_full.gather(1, greedy.tokens[:, None]).squeeze(1))
    assert bool((greedy.sampling_logprobs == 0).all())

    topk = sample_vocab_parallel(logits, SamplingParams(temperature=0.7, top_k=3), _keys(4000), text_vocab_size=10)
    rank = (logits[:, :10] > logits[:, :10].gather(1, topk.tokens[:, None])).sum(1)
    assert int(rank.max()) <= 2 and int(rank.min()) == 0
    ref = torch.log_softmax(logits[:, :10].topk(3).values / 0.7, dim=-1)
    torch.testing.assert_close(topk.sampling_logprobs, ref.gather(1, rank[:, None]).squeeze(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(topk.logprobs, lp_full.gather(1, topk.tokens[:, None]).squeeze(1))

    topp = sample_vocab_parallel(logits, SamplingParams(top_p=0.5), _keys(4000), text_vocab_size=10)
    probs, order = lp_full.exp().sort(dim=1, descending=True)
    nucleus = (probs.cumsum(1) - probs) < 0.5
    pos = (order == topp.tokens[:, None]).int().argmax(1)
    assert bool(nucleus.gather(1, pos[:, None]).all())
    assert bool((topp.tokens < 10).all())


def test_sampler_matches_the_softmax_and_is_reproducible():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5]]).expand(40000, -1).contiguous()
    params = SamplingParams(temperature=1.5, seed=3)
    a = sample_vocab_parallel(logits, params, _keys(40000, seed=3), text_vocab_size=5)
    b = sample_vocab_parallel(logits, params, _keys(40000, seed=3), text_vocab_size=5)
    assert torch.equal(a.tokens, b.tokens)
    freq = torch.bincount(a.tokens, minlength=5).double() / 40000
    expect = torch.softmax(logits[0].double() / 1.5, dim=0)
    assert float((freq - expect).abs().max()) < 0.01
    torch.testing.assert_close(a.sampling_logprobs, torch.log(expect).float()[a.tokens], atol=1e-5, rtol=0)
    c = sample_vocab_parallel(logits, params, _keys(40000, seed=4), text_vocab_size=5)
    assert not torch.equal(a.tokens, c.tokens)
    d = sample_vocab_parallel(logits, params, _keys(40000, seed=3, step=1), text_vocab_size=5)
    assert not torch.equal(a.tokens, d.tokens)


def test_sampling_params_validation():
    assert SamplingParams(temperature=0).greedy
    for bad in (dict(top_p=0.0), dict(top_k=-1), dict(n=0), dict(max_new_tokens=0), dict(temperature=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert math.isclose(SamplingParams(top_p=0.5).top_p, 0.5)


# ------------------------------------------------------------------------------------------------------
# The pipelined decode at TP=2 x PP=2 and, with an MoE model, PP=2 x EP=2 (one 4-rank spawn).
# ------------------------------------------------------------------------------------------------------


def _assert_same_rollouts(got: dict, ref: dict, what) -> None:
    for key in ("tokens", "lengths", "finished", "sample_to_prompt"):
        assert torch.equal(got[key], ref[key]), (what, key)
    for key in ("logprobs", "sampling_logprobs"):
        torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=0, msg=lambda m: f"{what} {key}: {m}")


@pytest.mark.parity
@pytest.mark.slow
def test_pipelined_decode_at_tp2_pp2_and_moe_pp2_ep2_equals_single_process():
    per_rank = run_distributed(_pipelined_checks, 4, timeout_s=300)
    for rank, res in enumerate(per_rank):
        for name in ("greedy", "filtered", "plain"):
            _assert_same_rollouts(res["tp2pp2"][name], res["reference"][name], (rank, "tp2pp2", name))
        for case, (got, ref) in enumerate(zip(res["pp2ep2"], res["moe_reference"][res["moe_dp"]])):
            _assert_same_rollouts(got, ref, (rank, "pp2ep2", case))
    assert sorted(r["moe_dp"] for r in per_rank) == [0, 0, 1, 1]
    # The pipeline at DP rank 0 stops after one token (its stop ids) while the other runs to the end.
    lengths = {r["moe_dp"]: r["pp2ep2"][0]["lengths"].tolist() for r in per_rank}
    assert set(lengths[0]) == {1} and set(lengths[1]) == {6}, lengths
