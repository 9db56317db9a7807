"""The X-OPD objective's pieces against the paper's formulas, on plain tensors."""

import pytest
import torch

from megatron_xopd.algo import CROSS_MODAL, IN_MODAL, XOPDConfig, policy_gradient_terms, rollout_weights, weighted_loss


def _paper_objective(new, old, teacher, lengths, modality, lam):
    """L = lam * L_im + (1 - lam) * L_cm, L_x = mean_j (1/|y_j|) sum_t r A, written out loop by loop."""
    per_modality = {IN_MODAL: [], CROSS_MODAL: []}
    for j in range(new.shape[0]):
        n = int(lengths[j])
        r = torch.exp(new[j, :n] - old[j, :n])
        per_modality[int(modality[j])].append((r * (teacher[j, :n] - old[j, :n])).sum() / n)
    terms = {m: torch.stack(v).mean() if v else torch.tensor(0.0) for m, v in per_modality.items()}
    return lam * terms[IN_MODAL] + (1 - lam) * terms[CROSS_MODAL]


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_weighted_loss_is_minus_the_paper_objective(lam):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 5, 1, 4, 2])
    modality = torch.tensor([IN_MODAL, CROSS_MODAL, CROSS_MODAL, IN_MODAL, CROSS_MODAL])
    new = -torch.rand(5, 5, generator=g).requires_grad_()
    old = new.detach() + 0.1 * torch.randn(5, 5, generator=g)
    teacher = -torch.rand(5, 5, generator=g)
    mask = (torch.arange(5) < lengths.unsqueeze(1)).float()
    cfg = XOPDConfig(lam=lam)
    counts = {m: float((modality == m).sum()) for m in (IN_MODAL, CROSS_MODAL)}
    tokens = {m: float(lengths[modality == m].sum()) for m in (IN_MODAL, CROSS_MODAL)}
    weights = rollout_weights(lengths, modality, cfg, global_rollouts=counts, global_tokens=tokens)
    terms, ratio = policy_gradient_terms(new, old, teacher - old, mask)
    loss = weighted_loss(terms, mask, weights, maximise=True)
    expected = -_paper_objective(new, old, teacher, lengths, modality, lam)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, new)
    (expected_grad,) = torch.autograd.grad(expected, new)
    torch.testing.assert_close(grad, expected_grad)
    # lam = 1 (0) drops the cross-modal (in-modal) term entirely: zero weight, zero gradient there.
    dropped = {1.0: CROSS_MODAL, 0.0: IN_MODAL}.get(lam)
    if dropped is not None:
        assert torch.all(weights[modality == dropped] == 0)
        assert torch.all(grad[modality == dropped] == 0)
        assert cfg.modalities == ((IN_MODAL,) if lam == 1.0 else (CROSS_MODAL,))


def test_token_normalisation_averages_over_all_tokens_of_a_modality():
    lengths = torch.tensor([1, 3])
    modality = torch.tensor([IN_MODAL, IN_MODAL])
    cfg = XOPDConfig(lam=1.0, normalization="token")
    w = rollout_weights(lengths, modality, cfg, global_rollouts={0: 2, 1: 0}, global_tokens={0: 4, 1: 0})
    torch.testing.assert_close(w, torch.tensor([0.25, 0.25]))
    seq = rollout_weights(lengths, modality, XOPDConfig(lam=1.0), global_rollouts={0: 2, 1: 0}, global_tokens={0: 4, 1: 0})
    torch.testing.assert_close(seq, torch.tensor([0.5, 1 / 6]))


def test_ratio_starts_at_one_and_clipping_bounds_it():
    new = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    mask = torch.ones(1, 3)
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    terms, ratio = policy_gradient_terms(new, new.detach(), adv, mask)
    assert torch.equal(ratio, torch.ones(1, 3)) and torch.equal(terms, adv)
    old = new.detach() - torch.tensor([[0.5, -0.5, 0.0]])  # ratios e^0.5, e^-0.5, 1
    clipped, _ = policy_gradient_terms(new, old, adv, mask, clip_ratio=0.2)
    expected = torch.minimum(torch.exp(new - old) * adv, torch.exp(new - old).clamp(0.8, 1.2) * adv)
    torch.testing.assert_close(clipped, expected)
    assert float(clipped[0, 0]) == pytest.approx(1.2)


@pytest.mark.parametrize("field,value,message", [
    ("lam", 1.5, "xopd.lam"), ("loss", "kl", "xopd.loss"), ("normalization", "batch", "xopd.normalization"),
    ("beta", -0.1, "xopd.beta"), ("clip_ratio", 0.0, "xopd.clip_ratio"), ("responses", "replay", "xopd.responses"),
    ("loss", "sft", "xopd.responses=teacher_greedy"), ("responses", "teacher_greedy", "xopd.responses=on_policy"),
    ("responses", "transcript", "set xopd.loss=sft"),
])
def test_bad_xopd_config_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        XOPDConfig(**{field: value})


def test_baselines_are_valid_configs():
    assert XOPDConfig(loss="sft", responses="teacher_greedy", lam=0.0).modalities == (1,)
    assert XOPDConfig(loss="jsd", beta=0.0, responses="teacher_greedy").modalities == (0, 1)
