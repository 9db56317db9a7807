"""Parallel model code against single-process references, on real megatron-core with gloo ranks."""

import pytest
import torch

from megatron_xopd.testing import run_distributed
from tests._models import VOCAB, canonical_weights, tiny_gpt_config, tiny_perception_config, token_batch


def _loss_weights(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(123))


def _gathered_logits(model, ids, pos) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(model(ids, pos, None))[..., :VOCAB]


def _tp_vs_tp1(family: str) -> dict:
    """On 2 ranks: TP=1 (DP=2) reference, then TP=2 with the same weights; logits and gradients."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_xopd.models import build_gpt_model, gather_canonical_state_dict, load_canonical_state_dict
    from megatron_xopd.runtime import ParallelConfig, initialize_model_parallel, set_seed

    cfg = tiny_gpt_config(family)
    ids, pos = token_batch()
    results = {}
    for tp in (1, 2):
        initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=tp))
        set_seed(0)
        model = build_gpt_model(cfg)
        if tp == 1:
            weights = gather_canonical_state_dict(model, VOCAB)
        else:
            load_canonical_state_dict(model, weights)
        # megatron's DDP + finalize_model_grads, as in training: it also sums the QK-norm grads over TP.
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        logits = _gathered_logits(ddp, ids, pos)
        (logits * _loss_weights(logits.shape)).sum().backward()
        finalize_model_grads([ddp])
        results[tp] = (logits.detach(), gather_canonical_state_dict(ddp, VOCAB, grads=True))
    return {"logits": (results[1][0], results[2][0]), "grads": (results[1][1], results[2][1])}


@pytest.mark.parity
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tp2_logits_and_grads_equal_tp1(family):
    out = run_distributed(_tp_vs_tp1, 2, family)[0]
    ref, tp2 = out["logits"]
    assert ref.shape == (2, 9, VOCAB)
    torch.testing.assert_close(tp2, ref, atol=1e-5, rtol=0)
    grads_ref, grads_tp2 = out["grads"]
    assert grads_ref.keys() == grads_tp2.keys()
    assert any("linear_fc1" in k for k in grads_ref) and any(k.endswith("linear_qkv.weight") for k in grads_ref)
    for key in grads_ref:
        assert grads_ref[key].abs().sum() > 0, key
        torch.testing.assert_close(grads_tp2[key], grads_ref[key], atol=1e-5, rtol=1e-4, msg=key)


def _pipeline_losses(pp: int) -> tuple[list[float], dict]:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_xopd.models import build_gpt_model, gather_canonical_state_dict
    from megatron_xopd.runtime import ParallelConfig, initialize_model_parallel, set_seed

    cfg = tiny_gpt_config("llama")
    initialize_model_parallel(ParallelConfig(pipeline_model_parallel_size=pp))
    # Same weights at PP=1 and PP=2: every rank builds the full model from one seed, then keeps its stage.
    set_seed(0)
    micro_batches = [token_batch(seed=s) for s in range(3)]

    full = canonical_weights(cfg, seed=0)
    model = build_gpt_model(cfg)
    from megatron_xopd.models import load_canonical_state_dict

    load_canonical_state_dict(model, full)

    def forward_step(data_iterator, model):
        ids, pos = next(data_iterator)
        logits = model(ids, pos, None)

        def loss_func(output):
            loss = (output[..., :VOCAB] * _loss_weights(output[..., :VOCAB].shape)).mean()
            return loss, {"loss": loss.detach()}

        return logits, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=9,
        micro_batch_size=2,
        forward_only=False,
    )
    values = [float(d["loss"]) for d in losses] if parallel_state.is_pipeline_last_stage() else []
    return values, gather_canonical_state_dict(model, VOCAB, grads=True)


@pytest.mark.parity
def test_pp2_schedule_equals_pp1():
    ref_losses, ref_grads = run_distributed(_pipeline_losses, 1, 1)[0]
    (_, grads_first), (pp_losses, grads_last) = run_distributed(_pipeline_losses, 2, 2)
    assert len(ref_losses) == 3
    torch.testing.assert_close(torch.tensor(pp_losses), torch.tensor(ref_losses), atol=1e-6, rtol=1e-5)
    assert grads_first.keys() == ref_grads.keys() == grads_last.keys()
    for key in ref_grads:
        torch.testing.assert_close(grads_last[key], ref_grads[key], atol=1e-6, rtol=1e-4, msg=key)


def _speech_splice() -> dict:
    from megatron.core import parallel_state

    from megatron_xopd.models import SpeechStudent, expand_audio_locators
    from megatron_xopd.runtime import set_seed

    set_seed(0)
    locator = VOCAB  # the added token, just past the text vocabulary
    cfg = tiny_gpt_config(vocab_size=VOCAB + 1, text_vocab_size=VOCAB)
    student = SpeechStudent(cfg, tiny_perception_config(), audio_locator_id=locator)
    features = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    frames = torch.tensor([5, 3])
    audio = student.embed_audio(features, frames)
    prompts = [expand_audio_locators([1, 2, locator, 3], len(a), locator) for a in audio]
    width = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    pos = torch.arange(width).expand(2, -1)
    spliced = student.splice(ids, pos, torch.cat(audio)).transpose(0, 1)  # [B, S, H]
    text_only = student.language_model.embedding(input_ids=ids.masked_fill(ids == locator, 0), position_ids=pos).transpose(0, 1)
    logits = student(ids, pos, None, audio_embeds=torch.cat(audio))
    errors = []
    for bad in (torch.cat(audio)[:-1], None):
        try:
            student(ids, pos, None, audio_embeds=bad)
        except ValueError as err:
            errors.append(str(err))
    return {
        "audio_rows_ok": all(torch.equal(spliced[b, 2 : 2 + len(a)], a) for b, a in enumerate(audio)),
        "text_rows_ok": torch.equal(spliced[ids != locator], text_only[ids != locator]),
        "lens": [len(p) for p in prompts],
        "proj_frozen": not any(p.requires_grad for p in student.perception.parameters()),
        "logits_shape": tuple(logits.shape),
        "errors": errors,
        "spliced": spliced.detach(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
    }


@pytest.mark.parity
def test_speech_student_splices_perception_at_locators_tp2():
    a, b = run_distributed(_speech_splice, 2, tp=2)
    for r in (a, b):
        assert r["audio_rows_ok"] and r["text_rows_ok"] and r["proj_frozen"]
        assert r["lens"] == [3 + 5, 3 + 3]
        assert r["logits_shape"][:2] == (2, 8)
        assert "7 audio embeddings" in r["errors"][0] and "8 audio-locator positions" in r["errors"][0]
        assert "no audio_embeds" in r["errors"][1]
    torch.testing.assert_close(a["spliced"], b["spliced"], atol=0, rtol=0)  # replicated over TP


def _vocab_partition() -> tuple:
    from megatron_xopd.models import build_teacher, common_padded_vocab, vocab_shard_range
    from megatron_xopd.runtime import set_seed

    set_seed(0)
    student = tiny_gpt_config(vocab_size=VOCAB + 1, text_vocab_size=VOCAB)
    teacher = tiny_gpt_config()
    padded = common_padded_vocab([student, teacher], 2)
    student.padded_vocab_size = teacher.padded_vocab_size = padded
    t_model = build_teacher(teacher, student)
    shard = vocab_shard_range(teacher)
    logits = t_model(*token_batch(), None)
    return shard, vocab_shard_range(student), logits.shape[-1], t_model.training, any(
        p.requires_grad for p in t_model.parameters())


@pytest.mark.parity
def test_teacher_and_student_vocab_partitions_agree_tp2():
    results = run_distributed(_vocab_partition, 2, tp=2)
    (t0, s0, width, training, grads), (t1, s1, _, _, _) = results
    assert t0 == s0 == (0, width) and t1 == s1 == (width, 2 * width)
    assert 2 * width >= VOCAB + 1 and not training and not grads
