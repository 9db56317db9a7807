"""The vocab-parallel ops at TP = 1 against the float64 full-vocabulary references in ``_ops_reference``."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_xopd.ops import (
    KINDS,
    fused_linear_divergence,
    fused_linear_divergence_loss,
    fused_linear_logprobs,
    vocab_parallel_divergence,
    vocab_parallel_logprobs,
    vocab_parallel_topk_divergence,
)
from tests import _ops_reference as ref

N, V = 7, 19
KIND_BETAS = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]
MASK = torch.tensor([True, False, True, True, False, True, True])


def _ids(kind: str, beta: float) -> str:
    return f"{kind}-{beta}"


@pytest.mark.parametrize("kind,beta", KIND_BETAS, ids=[_ids(*kb) for kb in KIND_BETAS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_divergence_matches_reference(kind, beta, dtype):
    s, t = ref.make_logits(N, V, seed=0)
    upstream = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    opts = dict(beta=beta, temperature=1.7, mask=MASK, vocab_size=V - 3)
    expected, expected_grad = ref.reference_grad(lambda x: ref.divergence(x, t, kind, **opts), s, upstream)
    x = s.to(dtype).requires_grad_()
    value = vocab_parallel_divergence(x, t.to(dtype), kind, chunk_size=2, **opts)
    (value * upstream.to(dtype)).sum().backward()
    assert value.dtype == dtype and value.shape == (N,)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(value.double(), expected, **tol)
    torch.testing.assert_close(x.grad.double(), expected_grad, **tol)
    assert (value[~MASK] == 0).all() and (x.grad[~MASK] == 0).all() and (x.grad[:, V - 3 :] == 0).all()


@pytest.mark.parametrize("kind,beta", KIND_BETAS, ids=[_ids(*kb) for kb in KIND_BETAS])
def test_grad_in_forward_matches_reference(kind, beta):
    """The gradient written in the forward (unit upstream) and scaled in backward equals the reference's; the
    scale is in place, so autograd refuses a second backward through the same graph."""
    s, t = ref.make_logits(N, V, seed=0)
    upstream = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    opts = dict(beta=beta, temperature=1.7, mask=MASK, vocab_size=V - 3)
    expected, expected_grad = ref.reference_grad(lambda x: ref.divergence(x, t, kind, **opts), s, upstream)
    x = s.float().requires_grad_()
    value = vocab_parallel_divergence(x, t.float(), kind, chunk_size=2, grad_in_forward=True, **opts)
    (value * upstream.float()).sum().backward(retain_graph=True)
    torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), expected_grad, rtol=1e-4, atol=1e-5)
    assert (x.grad[~MASK] == 0).all() and (x.grad[:, V - 3 :] == 0).all()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        value.sum().backward()


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs(kind):
    s, t = ref.make_logits(N, V, seed=2)
    s16, t16 = s.bfloat16(), t.bfloat16()
    expected, expected_grad = ref.reference_grad(lambda x: ref.divergence(x, t16, kind, temperature=0.8), s16)
    x = s16.clone().requires_grad_()
    value = vocab_parallel_divergence(x, t16, kind, temperature=0.8)
    value.sum().backward()
    assert value.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    # The math is float32 on the bf16 values; only the gradient is rounded to bf16.
    torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), expected_grad, rtol=1e-2, atol=1e-2 * expected_grad.abs().max().item())


@pytest.mark.parametrize("kind,beta", KIND_BETAS, ids=[_ids(*kb) for kb in KIND_BETAS])
def test_divergence_gradcheck(kind, beta):
    s, t = ref.make_logits(5, 11, seed=3)
    mask = torch.tensor([True, True, False, True, True])
    fn = lambda x: vocab_parallel_divergence(  # noqa: E731
        x, t, kind, beta=beta, temperature=1.3, mask=mask, chunk_size=2, vocab_size=9
    )
    assert torch.autograd.gradcheck(fn, (s.requires_grad_(),))


@pytest.mark.parametrize("kind,beta", KIND_BETAS[:3], ids=[_ids(*kb) for kb in KIND_BETAS[:3]])
def test_topk_matches_reference_and_gradcheck(kind, beta):
    s, t = ref.make_logits(N, V, seed=4)
    ids, log_p = ref.teacher_topk(t, k=4, vocab_size=V - 2)
    ids = ids.flip(1)  # any order
    log_p = log_p.flip(1)
    opts = dict(kind=kind, beta=beta, temperature=1.4, mask=MASK, vocab_size=V - 2)
    expected, expected_grad = ref.reference_grad(lambda x: ref.topk_divergence(x, ids, log_p, **opts), s)
    x = s.clone().requires_grad_()
    value = vocab_parallel_topk_divergence(x, ids, log_p, chunk_size=3, **opts)
    value.sum().backward()
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-6, atol=1e-6)
    fn = lambda x: vocab_parallel_topk_divergence(x, ids, log_p, chunk_size=3, **opts)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s.requires_grad_(),))


def test_topk_float32_and_gradient_formula():
    s, t = ref.make_logits(N, V, seed=5)
    ids, log_p = ref.teacher_topk(t, k=5)
    x = s.float().requires_grad_()
    value = vocab_parallel_topk_divergence(x, ids, log_p.float())
    value.sum().backward()
    torch.testing.assert_close(value.double(), ref.topk_divergence(s, ids, log_p), rtol=1e-4, atol=1e-5)
    # The math doc's forward-KL gradient: q_k - p_k on the ids, q_k (1 - p_tail / q_tail) elsewhere.
    q = ref.log_softmax(s).exp()
    in_ids = torch.zeros_like(q, dtype=torch.bool).scatter_(1, ids, True)
    p_tail = 1 - log_p.exp().sum(1, keepdim=True)
    q_tail = q.masked_fill(in_ids, 0).sum(1, keepdim=True)
    expected = torch.where(in_ids, q - torch.zeros_like(q).scatter_(1, ids, log_p.exp()), q * (1 - p_tail / q_tail))
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind,beta", KIND_BETAS[:3], ids=[_ids(*kb) for kb in KIND_BETAS[:3]])
def test_fused_linear_matches_logits_and_gradcheck(kind, beta):
    gen = torch.Generator().manual_seed(6)
    h_s, w_s = torch.randn(N, 5, generator=gen, dtype=torch.float64), torch.randn(V, 5, generator=gen).double()
    h_t, w_t = torch.randn(N, 4, generator=gen, dtype=torch.float64), torch.randn(V, 4, generator=gen).double()
    opts = dict(beta=beta, temperature=1.2, mask=MASK, vocab_size=V - 1)
    h, w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    value = fused_linear_divergence(h, w, h_t, w_t, kind, chunk_size=3, **opts)
    value.sum().backward()
    h2, w2 = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    expected = ref.divergence(h2 @ w2.t(), h_t @ w_t.t(), kind, **opts)
    expected.sum().backward()
    torch.testing.assert_close(value, expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-6, atol=1e-6)
    # gradcheck perturbs every input element: a smaller problem.
    h_s, w_s, h_t, w_t = h_s[:4, :3], w_s[:9, :3], h_t[:4], w_t[:9]
    opts.update(mask=MASK[:4], vocab_size=8)
    fn = lambda h, w: fused_linear_divergence(h, w, h_t, w_t, kind, chunk_size=3, **opts)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h_s.clone().requires_grad_(), w_s.clone().requires_grad_()))


@pytest.mark.parametrize("kind,beta", KIND_BETAS[:3], ids=[_ids(*kb) for kb in KIND_BETAS[:3]])
def test_fused_linear_loss_takes_the_gradient_in_the_forward(kind, beta):
    """sum_i c_i D_i with the gradient computed in the forward equals the reference's, and its values D."""
    gen = torch.Generator().manual_seed(8)
    h_s, w_s = torch.randn(N, 5, generator=gen, dtype=torch.float64), torch.randn(V, 5, generator=gen).double()
    h_t, w_t = torch.randn(N, 4, generator=gen, dtype=torch.float64), torch.randn(V, 4, generator=gen).double()
    coefficients = torch.rand(N, generator=gen, dtype=torch.float64)
    opts = dict(beta=beta, temperature=1.2, mask=MASK, vocab_size=V - 1)
    h, w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    loss, value = fused_linear_divergence_loss(h, w, h_t, w_t, kind, coefficients, chunk_size=3, **opts)
    (2.5 * loss).backward()  # the upstream scalar scales the gradients kept from the forward
    h2, w2 = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    expected = ref.divergence(h2 @ w2.t(), h_t @ w_t.t(), kind, **opts)
    (2.5 * (expected * coefficients).sum()).backward()
    assert not value.requires_grad
    torch.testing.assert_close(value, expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.detach(), (expected * coefficients).sum().detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # no gradient work without autograd
        loss, _ = fused_linear_divergence_loss(h, w, h_t, w_t, kind, coefficients, chunk_size=3, **opts)
    assert loss.grad_fn is None


@pytest.mark.parametrize("kind,buffers", [("reverse_kl", 4), ("forward_kl", 4), ("jsd", 6)])
def test_fused_linear_loss_chunk_buffers_and_gradient_written_over_the_logits(kind, buffers, monkeypatch):
    """float32 at temperature 1: a chunk holds at most ``buffers`` [c, V] work buffers (the gradient overwrites the
    student logits chunk), and the result still equals the float64 reference."""
    from megatron_xopd.ops import kernels

    sizes: dict[int, int] = {}
    get = kernels.Workspace.get

    def recording_get(self, slot, shape, dtype, device):
        sizes[slot] = max(sizes.get(slot, 0), math.prod(shape))
        return get(self, slot, shape, dtype, device)

    monkeypatch.setattr(kernels.Workspace, "get", recording_get)
    gen = torch.Generator().manual_seed(9)
    h_s, w_s, h_t, w_t = (torch.randn(*shape, generator=gen) for shape in ((N, 5), (V, 5), (N, 4), (V, 4)))
    coefficients = torch.rand(N, generator=gen)
    h, w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    loss, value = fused_linear_divergence_loss(h, w, h_t, w_t, kind, coefficients, chunk_size=3)
    loss.backward()
    assert sum(size >= 3 * V for size in sizes.values()) <= buffers, sizes
    h2, w2 = h_s.double().requires_grad_(), w_s.double().requires_grad_()
    expected = ref.divergence(h2 @ w2.t(), (h_t @ w_t.t()).double(), kind)
    (expected * coefficients.double()).sum().backward()
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_linear_logprobs_and_gradients_equal_the_reference(dtype):
    """Log-probs of the targets from hidden states through the head (padding rows of the head ignored), and their
    gradients w.r.t. both, equal the float64 full-vocabulary reference; no gradient work under no_grad."""
    gen = torch.Generator().manual_seed(11)
    h0, w0 = torch.randn(N, 6, generator=gen, dtype=torch.float64), torch.randn(V, 6, generator=gen).double()
    targets = torch.randint(0, V - 2, (N,), generator=gen)
    upstream = torch.rand(N, generator=gen, dtype=torch.float64)
    h, w = h0.to(dtype).clone().requires_grad_(), w0.to(dtype).clone().requires_grad_()
    lp = fused_linear_logprobs(h, w, targets, vocab_size=V - 2, temperature=1.3, chunk_size=3)
    (lp * upstream.to(lp.dtype)).sum().backward()
    h2, w2 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    expected, _ = ref.logprobs(h2 @ w2.t(), targets, 1.3, V - 2)
    (expected * upstream).sum().backward()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp.double(), expected.detach(), **tol)
    torch.testing.assert_close(h.grad.double(), h2.grad, **tol)
    torch.testing.assert_close(w.grad.double(), w2.grad, **tol)
    assert bool((w.grad[V - 2 :] == 0).all())  # padding rows of the head get no gradient
    with torch.no_grad():
        assert fused_linear_logprobs(h, w, targets, vocab_size=V - 2).grad_fn is None


def test_fused_linear_bf16():
    gen = torch.Generator().manual_seed(7)
    h_s, w_s = torch.randn(N, 8, generator=gen).bfloat16(), torch.randn(V, 8, generator=gen).bfloat16()
    h_t, w_t = torch.randn(N, 6, generator=gen).bfloat16(), torch.randn(V, 6, generator=gen).bfloat16()
    h, w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    value = fused_linear_divergence(h, w, h_t, w_t, "reverse_kl", chunk_size=2)
    value.sum().backward()
    assert value.dtype == torch.float32 and w.grad.dtype == torch.bfloat16 and h.grad.dtype == torch.bfloat16
    expected = ref.divergence((h_s @ w_s.t()).double(), (h_t @ w_t.t()).double(), "reverse_kl")
    torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-5)
    logits = (h_s @ w_s.t()).double().requires_grad_()
    ref.divergence(logits, (h_t @ w_t.t()).double(), "reverse_kl").sum().backward()
    torch.testing.assert_close(w.grad.double(), logits.grad.t() @ h_s.double(), rtol=2e-2, atol=2e-2)


def test_logprobs_matches_reference_and_gradcheck():
    s, _ = ref.make_logits(N, V, seed=8)
    targets = torch.randint(0, V - 2, (N,), generator=torch.Generator().manual_seed(9))
    lp, entropy = vocab_parallel_logprobs(s, targets, vocab_size=V - 2, temperature=1.5, return_entropy=True)
    expected_lp, expected_entropy = ref.logprobs(s, targets, 1.5, V - 2)
    torch.testing.assert_close(lp, expected_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-6, atol=1e-6)
    lp32 = vocab_parallel_logprobs(s.float(), targets, vocab_size=V - 2, temperature=1.5)
    torch.testing.assert_close(lp32.double(), expected_lp, rtol=1e-4, atol=1e-5)

    def both(x):
        lp, h = vocab_parallel_logprobs(
            x, targets, vocab_size=V - 2, temperature=1.5, return_entropy=True, chunk_size=3
        )
        return lp + 0.7 * h

    assert torch.autograd.gradcheck(both, (s.clone().requires_grad_(),))
    fn = lambda x: vocab_parallel_logprobs(x, targets, vocab_size=V - 2, chunk_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s.clone().requires_grad_(),))


def test_beta_endpoints_and_jsd_symmetry():
    s, t = ref.make_logits(N, V, seed=10)

    def value_and_grad(kind, beta, a=s, b=t):
        x = a.clone().requires_grad_()
        value = vocab_parallel_divergence(x, b, kind, beta=beta)
        value.sum().backward()
        return value, x.grad

    for beta, kl in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        for got, want in zip(value_and_grad("jsd", beta), value_and_grad(kl, beta)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # JSD_beta(q, p) = JSD_(1 - beta)(p, q); at beta = 1/2 it is symmetric and bounded by log 2.
    torch.testing.assert_close(value_and_grad("jsd", 0.3)[0], value_and_grad("jsd", 0.7, t, s)[0])
    half = value_and_grad("jsd", 0.5)[0]
    torch.testing.assert_close(half, value_and_grad("jsd", 0.5, t, s)[0])
    assert (half > 0).all() and (half <= math.log(2)).all()
    # Small beta is close to beta * forward KL (to first order), not to 0's endpoint.
    small = value_and_grad("jsd", 1e-4)[0]
    assert (small < 1e-3).all()


def test_temperature_chunking_and_identical_inputs():
    s, t = ref.make_logits(N, V, seed=11)
    values = [vocab_parallel_divergence(s, t, "jsd", temperature=2.5, chunk_size=c) for c in (1, 3, N, 100)]
    for value in values[1:]:
        torch.testing.assert_close(value, values[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(values[0], ref.divergence(s, t, "jsd", temperature=2.5))
    for kind in KINDS:
        x = s.clone().requires_grad_()
        value = vocab_parallel_divergence(x, s, kind)
        value.sum().backward()
        assert value.abs().max() < 1e-12 and x.grad.abs().max() < 1e-12


def test_masked_and_padded_garbage_is_ignored():
    s, t = ref.make_logits(N, V, seed=12)
    dirty_s, dirty_t = s.clone(), t.clone()
    dirty_s[~MASK] = math.nan
    dirty_t[~MASK] = math.inf
    dirty_s[:, V - 4 :] = 1e30
    dirty_t[:, V - 4 :] = -math.inf
    for kind in KINDS:
        x = dirty_s.clone().requires_grad_()
        value = vocab_parallel_divergence(x, dirty_t, kind, mask=MASK, vocab_size=V - 4)
        value.sum().backward()
        expected = ref.divergence(s, t, kind, vocab_size=V - 4) * MASK
        torch.testing.assert_close(value, expected)
        assert torch.isfinite(x.grad).all() and (x.grad[~MASK] == 0).all() and (x.grad[:, V - 4 :] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_are_finite(dtype):
    gen = torch.Generator().manual_seed(13)
    s = (torch.randint(-1, 2, (N, V), generator=gen) * 1e4).to(dtype)
    t = (torch.randint(-1, 2, (N, V), generator=gen) * 1e4).to(dtype)
    s[0], t[0] = 1e4, -1e4  # constant rows
    s[1, 0], t[1, 0] = 1e4 + 3, -1e4
    for kind, beta in KIND_BETAS:
        x = s.clone().requires_grad_()
        value = vocab_parallel_divergence(x, t, kind, beta=beta, chunk_size=3)
        value.sum().backward()
        assert torch.isfinite(value).all() and torch.isfinite(x.grad).all(), kind
        torch.testing.assert_close(value.double(), ref.divergence(s, t, kind, beta), rtol=1e-5, atol=1e-3)
    ids, log_p = ref.teacher_topk(t.double() / 1e3, k=3)  # a teacher with finite top-k log-probs
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        x = s.clone().requires_grad_()
        value = vocab_parallel_topk_divergence(x, ids, log_p.to(dtype), kind=kind)
        value.sum().backward()
        assert torch.isfinite(value).all() and torch.isfinite(x.grad).all(), kind
    x = s.clone().requires_grad_()
    lp, entropy = vocab_parallel_logprobs(x, ids[:, 0], return_entropy=True)
    (lp + entropy).sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(entropy).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(lp.double(), ref.logprobs(s, ids[:, 0])[0], rtol=1e-6, atol=1e-3)


def test_topk_teacher_mass_rounding_to_one_stays_finite():
    s, _ = ref.make_logits(2, V, seed=14)
    ids = torch.tensor([[0, 1], [2, 3]])
    log_p = torch.tensor([[0.0, -30.0], [-1e-9, -40.0]])  # top-k mass >= 1 after rounding
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        x = s.clone().requires_grad_()
        value = vocab_parallel_topk_divergence(x, ids, log_p, kind=kind)
        value.sum().backward()
        assert torch.isfinite(value).all() and torch.isfinite(x.grad).all(), kind


def test_invalid_arguments():
    s, t = ref.make_logits(N, V, seed=15)
    ids, log_p = ref.teacher_topk(t, k=3)
    bad_calls = {
        "unknown divergence kind": lambda: vocab_parallel_divergence(s, t, "kl"),
        "beta must be in": lambda: vocab_parallel_divergence(s, t, "jsd", beta=1.5),
        "same shape": lambda: vocab_parallel_divergence(s, t[:, :-1], "reverse_kl"),
        "V_local": lambda: vocab_parallel_divergence(s[None], t[None], "reverse_kl"),
        "mask must be": lambda: vocab_parallel_divergence(s, t, "reverse_kl", mask=torch.ones(N)),
        "vocab_size": lambda: vocab_parallel_divergence(s, t, "reverse_kl", vocab_size=V + 1),
        "temperature": lambda: vocab_parallel_divergence(s, t, "reverse_kl", temperature=0.0),
        "chunk_size": lambda: vocab_parallel_divergence(s, t, "reverse_kl", chunk_size=0),
        "must match": lambda: fused_linear_divergence(s, s[:, :3].t(), s, s.t(), "jsd"),
        "same tokens": lambda: fused_linear_divergence(s, t[:5], s[:2], t[:5], "jsd"),
        "distinct": lambda: vocab_parallel_topk_divergence(s, torch.zeros_like(ids), log_p),
        "global token ids": lambda: vocab_parallel_topk_divergence(s, ids + V, log_p),
        "shaped like": lambda: vocab_parallel_topk_divergence(s, ids, log_p[:, :2]),
        "leave a tail": lambda: vocab_parallel_topk_divergence(s, ids, log_p, vocab_size=3),
        "targets must be": lambda: vocab_parallel_logprobs(s, torch.full((N,), V)),
        "integer tensor": lambda: vocab_parallel_logprobs(s, torch.zeros(N)),
    }
    for message, call in bad_calls.items():
        with pytest.raises(ValueError, match=message):
            call()
