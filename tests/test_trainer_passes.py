"""The teacher and training passes of a step against a hand computation of the X-OPD formulas, and TP/PP parity.

Rollouts are fixed here (the rollout module is tested on its own): two text-prompted and two speech-prompted
responses. The reference computes log-softmax over the full vocabulary, one sequence at a time, in a single
process, and differentiates -(lam * L_im + (1 - lam) * L_cm) with plain autograd.
"""

import pytest
import torch

from megatron_xopd.algo import CROSS_MODAL, IN_MODAL, XOPDConfig
from megatron_xopd.testing import run_distributed
from tests._models import VOCAB, canonical_weights, tiny_gpt_config, tiny_perception_config

LOCATOR = VOCAB
LENGTHS = [3, 5, 2, 4]
MODALITY = [IN_MODAL, CROSS_MODAL, IN_MODAL, CROSS_MODAL]


def _configs():
    student = tiny_gpt_config(vocab_size=VOCAB + 1, text_vocab_size=VOCAB, padded_vocab_size=512)
    teacher = tiny_gpt_config(padded_vocab_size=512)
    return student, teacher


def _models(train_perception: bool = False, sequence_parallel: bool = False, recompute=None):
    from megatron_xopd.models import SpeechStudent, build_teacher, load_canonical_state_dict
    from megatron_xopd.runtime import set_seed

    set_seed(0)
    student_cfg, teacher_cfg = _configs()
    perception = tiny_perception_config()
    perception.freeze_adapter = not train_perception
    student = SpeechStudent(student_cfg, perception, LOCATOR, sequence_parallel=sequence_parallel, recompute=recompute)
    load_canonical_state_dict(student.language_model, canonical_weights(student_cfg, seed=1))
    teacher = build_teacher(teacher_cfg, student_cfg, sequence_parallel=sequence_parallel)
    load_canonical_state_dict(teacher, canonical_weights(teacher_cfg, seed=2))
    if student.perception is not None:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            student.perception.proj.weight.copy_(torch.randn(64, 16, generator=g) * 0.3)
            student.perception.proj.bias.zero_()
    return student, teacher


def _rollouts(student, train_perception: bool = False):
    from megatron_xopd.models import expand_audio_locators
    from megatron_xopd.algo import Rollouts

    g = torch.Generator().manual_seed(4)
    text_prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20, 21], [30, 31, 32, 33]]
    frames = [4, 2]
    features = torch.randn(2, 4, 16, generator=g)
    embeds = student.embed_audio(features, torch.tensor(frames)) if student.perception is not None else [None, None]
    speech = [expand_audio_locators([1, LOCATOR, 2], n, LOCATOR) for n in frames]
    student_prompts, audio, k = [], [], 0
    for j, m in enumerate(MODALITY):
        if m == IN_MODAL:
            student_prompts.append(text_prompts[j])
            audio.append(None)
        else:
            student_prompts.append(speech[k])
            audio.append(embeds[k].detach() if embeds[k] is not None and not train_perception else embeds[k])
            k += 1
    lengths = torch.tensor(LENGTHS)
    responses = torch.randint(0, VOCAB, (4, 5), generator=g) * (torch.arange(5) < lengths.unsqueeze(1))
    old = -3.0 - torch.rand(4, 5, generator=g)
    old = old * (torch.arange(5) < lengths.unsqueeze(1))
    inputs = [None, features[0], None, features[1, :2]] if train_perception else None
    return Rollouts(
        modality=torch.tensor(MODALITY), prompt_index=torch.arange(4), student_prompts=student_prompts,
        teacher_prompts=text_prompts, responses=responses, lengths=lengths, old_logprobs=old, audio_embeds=audio,
        audio_inputs=inputs,
    )


def _perception_grads(student) -> dict[str, torch.Tensor]:
    if student.perception is None:
        return {}
    return {n: (p.main_grad if getattr(p, "main_grad", None) is not None else p.grad).clone()
            for n, p in student.perception.named_parameters()}


def _hand_reference(lam: float, loss_kind: str, train_perception: bool = False):
    """Single process, full vocabulary, the formulas written out."""
    import torch.nn.functional as F

    from megatron_xopd.models import gather_canonical_state_dict

    student, teacher = _models(train_perception)
    r = _rollouts(student, train_perception)
    per_modality = {IN_MODAL: [], CROSS_MODAL: []}
    teacher_lp = torch.zeros(4, 5)
    for j in range(4):
        n = LENGTHS[j]
        resp = r.responses[j, :n]

        def logprobs(model, prompt, **kw):
            ids = torch.tensor([prompt + resp.tolist()])
            logits = model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None, **kw)[0, :, :VOCAB].float()
            return F.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + n], dim=-1)

        t_lp = logprobs(teacher, r.teacher_prompts[j]).detach()
        kw = {"audio_embeds": r.audio_embeds[j]} if r.audio_embeds[j] is not None else {}
        s_lp = logprobs(student, r.student_prompts[j], **kw)
        teacher_lp[j, :n] = t_lp.gather(1, resp.unsqueeze(1)).squeeze(1)
        if loss_kind == "sampled_token":
            new = s_lp.gather(1, resp.unsqueeze(1)).squeeze(1)
            old = r.old_logprobs[j, :n]
            adv = teacher_lp[j, :n] - old
            per_modality[MODALITY[j]].append((torch.exp(new - old) * adv).sum() / n)
        elif loss_kind == "sft":  # log-likelihood of the given responses
            per_modality[MODALITY[j]].append(s_lp.gather(1, resp.unsqueeze(1)).sum() / n)
        else:  # reverse KL(student || teacher), per token, full vocabulary
            kl = (s_lp.exp() * (s_lp - t_lp)).sum(-1)
            per_modality[MODALITY[j]].append(-kl.sum() / n)  # as an objective
    objective = sum(w * torch.stack(per_modality[m]).mean() for m, w in ((IN_MODAL, lam), (CROSS_MODAL, 1 - lam)) if w > 0)
    (-objective).backward()
    grads = gather_canonical_state_dict(student.language_model, VOCAB + 1, grads=True)
    if train_perception:
        return float(-objective), grads, teacher_lp, _perception_grads(student)
    return float(-objective), grads, teacher_lp


def _pipeline(lam: float, loss_kind: str, micro_batch_size: int, train_perception: bool = False,
              sequence_parallel: bool = False, form: str = "logits", topk: int = 32):
    from megatron.core import parallel_state

    from megatron_xopd.models import gather_canonical_state_dict
    from megatron_xopd.trainer.build import wrap_ddp
    from megatron_xopd.algo import LossStats
    from megatron_xopd.trainer.passes import score_with_teacher, train_pass
    from megatron_xopd.algo import rollout_weights

    student, teacher = _models(train_perception, sequence_parallel)
    r = _rollouts(student, train_perception)
    cfg = XOPDConfig(lam=lam, loss=loss_kind, responses="on_policy" if loss_kind == "sampled_token" else "teacher_greedy",
                     divergence_form=form, topk=topk)
    ddp = wrap_ddp(student)
    score_with_teacher(teacher, r, micro_batch_size, VOCAB, cfg)
    counts = {m: float((r.modality == m).sum()) for m in (IN_MODAL, CROSS_MODAL)}
    tokens = {m: float(r.lengths[r.modality == m].sum()) for m in (IN_MODAL, CROSS_MODAL)}
    r.weights = rollout_weights(r.lengths, r.modality, cfg, global_rollouts=counts, global_tokens=tokens)
    stats = LossStats()
    ddp.zero_grad_buffer()
    train_pass(ddp, r, torch.arange(4), cfg, micro_batch_size, VOCAB, stats)
    grads = gather_canonical_state_dict(student.language_model, VOCAB + 1, grads=True)
    last = parallel_state.is_pipeline_last_stage()
    if train_perception:
        return (stats.loss if last else None), grads, (r.teacher_logprobs if last else None), _perception_grads(student)
    return ((stats.loss if last else None), grads, (r.teacher_logprobs if last else None), stats.objective,
            len(student.language_model.decoder.layers))


def _assert_matches(result, reference):
    loss, grads, teacher_lp = result[:3]
    ref_loss, ref_grads, ref_teacher_lp = reference
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(teacher_lp, ref_teacher_lp, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys()
    nonzero = 0
    for key in ref_grads:
        torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-5, rtol=1e-4, msg=key)
        nonzero += bool(ref_grads[key].abs().sum() > 0)
    assert nonzero > len(ref_grads) // 2


@pytest.mark.parity
@pytest.mark.parametrize("lam,loss_kind", [(0.5, "sampled_token"), (0.0, "sampled_token"), (1.0, "sampled_token"),
                                           (0.5, "reverse_kl"), (0.5, "sft")])
def test_step_loss_and_gradient_equal_hand_computation_tp1(lam, loss_kind):
    reference = run_distributed(_hand_reference, 1, lam, loss_kind, tp=1)[0]
    # micro-batches of 3 rows: two micro-batches, the second padded with a zero-weight row
    result = run_distributed(_pipeline, 1, lam, loss_kind, 3, tp=1)[0]
    _assert_matches(result, reference)
    objective = result[3]
    if lam == 1.0:
        assert objective[CROSS_MODAL] == 0.0 and objective[IN_MODAL] != 0.0
    if lam == 0.0:
        assert objective[IN_MODAL] == 0.0 and objective[CROSS_MODAL] != 0.0


@pytest.mark.parity
def test_step_at_tp2_and_uneven_pp2_equals_tp1():
    """TP=2, and PP=2 split unevenly (3 + 1 of the 4 layers: ``num_layers_in_last_pipeline_stage``; the even PP=2
    split runs in the trainable-perception test below)."""
    reference = run_distributed(_hand_reference, 1, 0.5, "sampled_token", tp=1)[0]
    for layout in ({"tp": 2}, {"tp": 1, "pp": 2, "split": {"num_layers_in_last_pipeline_stage": 1}}):
        results = run_distributed(_pipeline, 2, 0.5, "sampled_token", 2, **layout)
        last = results[-1]
        if "pp" in layout:  # gradients of both stages are gathered on every rank
            assert results[0][0] is None
            assert [r[4] for r in results] == [3, 1]  # the layers each stage built
        _assert_matches(last, reference)


@pytest.mark.parity
def test_a_trainable_perception_gets_the_gradient_of_the_step():
    """With ``audio_inputs`` the training pass reruns the perception inside the forward: its gradient (the
    alignment stage's) equals autograd through the perception in one process, at TP=1, TP=2 and PP=2."""
    reference = run_distributed(_hand_reference, 1, 0.0, "sft", True, tp=1)[0]
    assert reference[3].keys() == {"proj.weight", "proj.bias"}
    for world, layout in ((1, {"tp": 1}), (2, {"tp": 2}), (2, {"tp": 1, "pp": 2})):
        results = run_distributed(_pipeline, world, 0.0, "sft", 3, True, **layout)
        _assert_matches(results[-1][:3] + (None,), reference[:3])
        with_perception = results if "pp" not in layout else results[:1]  # the first stage holds the perception
        for result in with_perception:
            for name, grad in reference[3].items():
                assert grad.abs().sum() > 0
                torch.testing.assert_close(result[3][name], grad, atol=1e-5, rtol=1e-4, msg=f"{layout} {name}")
        if "pp" in layout:
            assert results[1][3] == {}


@pytest.mark.parity
def test_step_with_sequence_parallelism_equals_tp1():
    """TP=2 with sequence parallelism (the speech splice on each rank's slice of the sequence, norms' gradients
    summed over TP): loss, teacher log-probs, LLM and trainable-perception gradients equal the single process."""
    reference = run_distributed(_hand_reference, 1, 0.5, "sft", True, tp=1)[0]
    results = run_distributed(_pipeline, 2, 0.5, "sft", 3, True, True, tp=2)
    for result in results:
        _assert_matches(result[:3] + (None,), reference[:3])
        for name, grad in reference[3].items():
            torch.testing.assert_close(result[3][name], grad, atol=1e-5, rtol=1e-4, msg=name)
