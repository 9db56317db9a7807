"""The full-vocabulary and top-k trainer losses (issue 16): the fused-linear form against the logits form and a
hand computation, and the teacher top-k losses against a float64 reference, at TP=1 and TP=2.

Rollouts and tiny models are those of ``tests/test_trainer_passes.py``.
"""

import pytest
import torch

from megatron_xopd.algo import CROSS_MODAL, IN_MODAL
from megatron_xopd.testing import run_distributed
from tests import _ops_reference as ref
from tests._models import VOCAB
from tests.test_trainer_passes import LENGTHS, MODALITY, _assert_matches, _hand_reference, _models, _pipeline, _rollouts

K = 5


def _topk_reference(lam: float, loss_kind: str):
    """Single process, float64: the teacher's top-K ids and log-probs, each bucket's probability written out
    (student tail = log-sum-exp over the other tokens), KL per token, the weighted loss and its gradient."""
    import torch.nn.functional as F

    from megatron_xopd.models import gather_canonical_state_dict

    student, teacher = _models()
    r = _rollouts(student)
    per_modality = {IN_MODAL: [], CROSS_MODAL: []}
    teacher_lp = torch.zeros(4, 5)
    for j in range(4):
        n = LENGTHS[j]
        resp = r.responses[j, :n]

        def logprobs(model, prompt, **kw):
            ids = torch.tensor([prompt + resp.tolist()])
            logits = model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None, **kw)[0, :, :VOCAB].double()
            return F.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + n], dim=-1)

        t_lp = logprobs(teacher, r.teacher_prompts[j]).detach()
        kw = {"audio_embeds": r.audio_embeds[j]} if r.audio_embeds[j] is not None else {}
        s_lp = logprobs(student, r.student_prompts[j], **kw)
        teacher_lp[j, :n] = t_lp.gather(1, resp.unsqueeze(1)).squeeze(1).float()
        top_p, ids = t_lp.topk(K, dim=-1)
        rest = torch.ones_like(s_lp, dtype=torch.bool).scatter_(1, ids, False)
        log_p = torch.cat([top_p, torch.log1p(-top_p.exp().sum(-1, keepdim=True))], dim=1)
        log_q = torch.cat([s_lp.gather(1, ids), torch.logsumexp(s_lp.masked_fill(~rest, -torch.inf), -1, keepdim=True)], 1)
        if loss_kind == "topk_reverse_kl":
            kl = (log_q.exp() * (log_q - log_p)).sum(-1)
        else:
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        per_modality[MODALITY[j]].append(-kl.sum() / n)
    objective = sum(w * torch.stack(per_modality[m]).mean() for m, w in ((IN_MODAL, lam), (CROSS_MODAL, 1 - lam)) if w > 0)
    (-objective).backward()
    return float(-objective), gather_canonical_state_dict(student.language_model, VOCAB + 1, grads=True), teacher_lp


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("loss_kind,layout,sp", [
    ("reverse_kl", {"tp": 1}, False), ("reverse_kl", {"tp": 2}, True), ("reverse_kl", {"tp": 1, "pp": 2}, False),
    ("sampled_token", {"tp": 2}, False), ("sampled_token", {"tp": 1, "pp": 2}, False), ("sft", {"tp": 1}, False),
], ids=["reverse_kl-tp1", "reverse_kl-tp2-sp", "reverse_kl-pp2", "sampled_token-tp2", "sampled_token-pp2", "sft-tp1"])
def test_linear_form_equals_hand_computation(loss_kind, layout, sp):
    """The linear form's loss, teacher log-probs and gradients equal the hand computation (float32, 1e-5), as the
    logits form's do (tests/test_trainer_passes.py): the full-vocabulary reverse KL, and the sampled tokens'
    log-probs of the sampled-token and SFT losses, from hidden states through the head shards; with sequence
    parallelism the hidden states are gathered."""
    reference = run_distributed(_hand_reference, 1, 0.5, loss_kind, tp=1)[0]
    world = layout["tp"] * layout.get("pp", 1)
    result = run_distributed(_pipeline, world, 0.5, loss_kind, 3, False, sp, "linear", **layout)[-1]
    _assert_matches(result, reference)


@pytest.mark.parity
@pytest.mark.slow
def test_fused_linear_jsd_equals_logits_form_at_tp2():
    logits = run_distributed(_pipeline, 2, 0.5, "jsd", 3, False, False, "logits", tp=2)[-1]
    linear = run_distributed(_pipeline, 2, 0.5, "jsd", 3, False, False, "linear", tp=2)[-1]
    assert logits[0] != 0.0
    _assert_matches(linear, logits[:3])


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("loss_kind", ["topk_reverse_kl", "topk_forward_kl"])
def test_topk_trainer_losses_equal_float64_reference_at_tp2(loss_kind):
    reference = run_distributed(_topk_reference, 1, 0.5, loss_kind, tp=1)[0]
    _assert_matches(run_distributed(_pipeline, 2, 0.5, loss_kind, 3, False, False, "logits", K, tp=2)[-1], reference)


def _topk_op(k: int, temperature: float, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch.distributed as dist

    from megatron_xopd.ops import vocab_parallel_topk

    _, t = ref.make_logits(6, 10, seed=5)
    rank = dist.get_rank()
    return vocab_parallel_topk(t[:, rank * 5 : (rank + 1) * 5], k, dist.group.WORLD, vocab_size=vocab,
                               temperature=temperature)


@pytest.mark.parity
@pytest.mark.parametrize("k,vocab", [(3, 9), (5, 4 + 3)])
def test_vocab_parallel_topk_equals_full_vocabulary_topk_at_tp2(k, vocab):
    """Ids (ordered) and log-probs of the teacher's top-k at TP=2 equal the float64 full-vocabulary ones; with
    vocab 7 rank 1 holds only 2 real columns, fewer than k."""
    _, t = ref.make_logits(6, 10, seed=5)
    log_p, ids = ref.log_softmax(t, 1.5, vocab).topk(k, dim=-1)
    for got_ids, got_lp in run_distributed(_topk_op, 2, k, 1.5, vocab):
        torch.testing.assert_close(got_ids, ids)
        torch.testing.assert_close(got_lp, log_p, atol=1e-12, rtol=0)


def test_bad_divergence_form_and_topk_name_the_config_key():
    from megatron_xopd.algo import XOPDConfig, teacher_keeps

    with pytest.raises(ValueError, match="xopd.divergence_form"):
        XOPDConfig(loss="reverse_kl", divergence_form="dense")
    with pytest.raises(ValueError, match="xopd.topk"):
        XOPDConfig(loss="topk_forward_kl", topk=0)
    keeps = {(loss, form): teacher_keeps(XOPDConfig(loss=loss, divergence_form=form))
             for loss in ("sampled_token", "jsd", "topk_reverse_kl") for form in ("linear", "logits")}
    assert keeps == {("sampled_token", "linear"): "logprobs", ("sampled_token", "logits"): "logprobs",
                     ("jsd", "linear"): "hidden", ("jsd", "logits"): "logits",
                     ("topk_reverse_kl", "linear"): "topk", ("topk_reverse_kl", "logits"): "topk"}
