"""The vocab-parallel ops at TP = 2 (gloo, two processes) against the float64 full-vocabulary references.

Each rank slices its vocabulary shard from the same seeded full tensors; the parent compares every rank's values
(which must be the full-vocabulary ones) and gradient shards with the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_xopd.ops import (
    fused_linear_divergence,
    fused_linear_divergence_loss,
    fused_linear_logprobs,
    vocab_parallel_divergence,
    vocab_parallel_logprobs,
    vocab_parallel_topk_divergence,
)
from megatron_xopd.testing import run_distributed
from tests import _ops_reference as ref

TP, N, V_LOCAL = 2, 6, 5
MASK = torch.tensor([True, True, False, True, True, True])
UPSTREAM = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
TEMPERATURE = 1.5
# name: (dtype, kind, beta, vocab_size, logit scale); vocab_size 4 leaves rank 1 without a real column.
DENSE = {
    "reverse": (torch.float64, "reverse_kl", 0.5, 9, 3.0),
    "forward": (torch.float64, "forward_kl", 0.5, 9, 3.0),
    "jsd": (torch.float64, "jsd", 0.3, 9, 3.0),
    "jsd-empty-shard": (torch.float64, "jsd", 0.3, 4, 3.0),
    "reverse-fp32": (torch.float32, "reverse_kl", 0.5, 10, 3.0),
    "jsd-bf16": (torch.bfloat16, "jsd", 0.5, 10, 3.0),
    "reverse-extreme-fp32": (torch.float32, "reverse_kl", 0.5, 10, 1e4),
    "forward-extreme-fp32": (torch.float32, "forward_kl", 0.5, 10, 1e4),
}
TOPK = {"topk-forward": ("forward_kl", 0.5), "topk-reverse": ("reverse_kl", 0.5), "topk-jsd": ("jsd", 0.4)}


def _inputs(seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    s, t = ref.make_logits(N, TP * V_LOCAL, seed=seed, scale=1.0)
    if scale > 100:  # extreme logits: ties and gaps of 1e4
        return s.round() * scale, t.round() * scale
    return s * scale, t * scale


def _linear_inputs() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(30)
    return [
        torch.randn(N, 4, generator=gen, dtype=torch.float64),
        torch.randn(TP * V_LOCAL, 4, generator=gen, dtype=torch.float64),
        torch.randn(N, 3, generator=gen, dtype=torch.float64),
        torch.randn(TP * V_LOCAL, 3, generator=gen, dtype=torch.float64),
    ]


def _out(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double()


def _tp_checks(group_name: str) -> dict:
    """On each rank: values and gradient shards of every op, with ``group`` WORLD or None (Megatron's TP group)."""
    rank = dist.get_rank()
    group = dist.group.WORLD if group_name == "world" else None
    cols = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    out = {}
    for name, (dtype, kind, beta, vocab, scale) in DENSE.items():
        s, t = _inputs(20, scale)
        x = s[:, cols].to(dtype).requires_grad_()
        value = vocab_parallel_divergence(
            x, t[:, cols].to(dtype), kind, beta=beta, temperature=TEMPERATURE, mask=MASK, group=group,
            chunk_size=2, vocab_size=vocab,
        )
        (value * UPSTREAM.to(value.dtype)).sum().backward()
        out[name] = [_out(value), _out(x.grad)]
    s, t = _inputs(21)
    ids, log_p = ref.teacher_topk(t, k=3, vocab_size=9)
    for name, (kind, beta) in TOPK.items():
        x = s[:, cols].clone().requires_grad_()
        value = vocab_parallel_topk_divergence(
            x, ids, log_p, kind=kind, beta=beta, temperature=TEMPERATURE, mask=MASK, group=group, chunk_size=4,
            vocab_size=9,
        )
        (value * UPSTREAM).sum().backward()
        out[name] = [_out(value), _out(x.grad)]
    h_s, w_s, h_t, w_t = _linear_inputs()
    h, w = h_s.requires_grad_(), w_s[cols].clone().requires_grad_()
    value = fused_linear_divergence(
        h, w, h_t, w_t[cols], "jsd", beta=0.6, temperature=TEMPERATURE, mask=MASK, group=group, chunk_size=4,
        vocab_size=9,
    )
    (value * UPSTREAM).sum().backward()
    out["linear"] = [_out(value), _out(h.grad), _out(w.grad)]
    # The same loss with its gradients taken in the forward (per-chunk collectives: 5 chunks of 4 tokens).
    h, w = h_s.detach().clone().requires_grad_(), w_s[cols].clone().requires_grad_()
    loss, value = fused_linear_divergence_loss(
        h, w, h_t, w_t[cols], "jsd", UPSTREAM, beta=0.6, temperature=TEMPERATURE, mask=MASK, group=group,
        chunk_size=4, vocab_size=9,
    )
    loss.backward()
    out["linear_loss"] = [_out(value), _out(h.grad), _out(w.grad)]
    x = s[:, cols].clone().requires_grad_()
    lp, entropy = vocab_parallel_logprobs(
        x, ids[:, 1], group, vocab_size=9, temperature=TEMPERATURE, return_entropy=True, chunk_size=4
    )
    (lp * UPSTREAM + entropy).sum().backward()
    out["logprobs"] = [_out(lp), _out(entropy), _out(x.grad)]
    # The targets' log-probs from hidden states through the head shard (3 chunks of 2 tokens); vocabulary 9.
    h, w = h_s.detach().clone().requires_grad_(), w_s[cols].clone().requires_grad_()
    lp = fused_linear_logprobs(h, w, ids[:, 1], group, vocab_size=9, temperature=TEMPERATURE, chunk_size=2)
    (lp * UPSTREAM).sum().backward()
    out["linear_logprobs"] = [_out(lp), _out(h.grad), _out(w.grad)]
    out["collectives"] = _collectives(s[:, cols], t[:, cols], group)
    return out


def _collectives(s: torch.Tensor, t: torch.Tensor, group) -> dict[str, list[str]]:
    """The all-reduces (shape and op) of a chunked reverse-KL forward and backward (3 chunks)."""
    calls, all_reduce = [], dist.all_reduce

    def counting(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append(f"{tuple(tensor.shape)} {op}")
        return all_reduce(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = counting
    try:
        x = s.clone().requires_grad_()
        value = vocab_parallel_divergence(x, t, "reverse_kl", group=group, chunk_size=2)
        forward = list(calls)
        value.sum().backward()
    finally:
        dist.all_reduce = all_reduce
    return {"forward": forward, "backward": calls[len(forward) :]}


def _expected() -> dict[str, list[torch.Tensor]]:
    """Values and full gradients from the single-process references."""
    expected = {}
    for name, (dtype, kind, beta, vocab, scale) in DENSE.items():
        s, t = (x.to(dtype).double() for x in _inputs(20, scale))
        fn = lambda x: ref.divergence(x, t, kind, beta, TEMPERATURE, MASK, vocab)  # noqa: E731
        expected[name] = list(ref.reference_grad(fn, s, UPSTREAM))
    s, t = _inputs(21)
    ids, log_p = ref.teacher_topk(t, k=3, vocab_size=9)
    for name, (kind, beta) in TOPK.items():
        fn = lambda x: ref.topk_divergence(x, ids, log_p, kind, beta, TEMPERATURE, MASK, 9)  # noqa: E731
        expected[name] = list(ref.reference_grad(fn, s, UPSTREAM))
    h_s, w_s, h_t, w_t = _linear_inputs()
    h, w = h_s.requires_grad_(), w_s.requires_grad_()
    value = ref.divergence(h @ w.t(), h_t @ w_t.t(), "jsd", 0.6, TEMPERATURE, MASK, 9)
    (value * UPSTREAM).sum().backward()
    expected["linear"] = expected["linear_loss"] = [value.detach(), h.grad, w.grad]
    x = s.clone().requires_grad_()
    lp, entropy = ref.logprobs(x, ids[:, 1], TEMPERATURE, 9)
    (lp * UPSTREAM + entropy).sum().backward()
    expected["logprobs"] = [lp.detach(), entropy.detach(), x.grad]
    h, w = h_s.detach().clone().requires_grad_(), w_s.detach().clone().requires_grad_()
    lp, _ = ref.logprobs(h @ w.t(), ids[:, 1], TEMPERATURE, 9)
    (lp * UPSTREAM).sum().backward()
    expected["linear_logprobs"] = [lp.detach(), h.grad, w.grad]
    return expected


def _tolerance(name: str, expected: torch.Tensor) -> dict[str, float]:
    if "bf16" in name:
        return dict(rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    if "extreme" in name:
        return dict(rtol=1e-5, atol=1e-3)
    if "fp32" in name:
        return dict(rtol=1e-4, atol=1e-5)
    return dict(rtol=1e-6, atol=1e-6)


def _shard_dim(name: str, i: int) -> int | None:
    """Which output is a vocabulary shard (and along which dim): the logits' gradient (dim 1) and the output
    weight's (dim 0). Per-token outputs and the replicated hidden state's gradient are full on every rank."""
    if name in ("linear", "linear_loss", "linear_logprobs"):
        return 0 if i == 2 else None
    return 1 if i == (2 if name == "logprobs" else 1) else None


def _compare(results: list[dict]) -> None:
    expected = _expected()
    for rank, result in enumerate(results):
        # Only per-token scalars cross ranks: one MAX of both maxima, one SUM of Z_s, Z_t and E_q[s - t].
        forward = [f"({N}, 2) {dist.ReduceOp.MAX}", f"({N}, 3) {dist.ReduceOp.SUM}"]
        assert result["collectives"] == {"forward": forward, "backward": []}
        for name, want in expected.items():
            for i, w in enumerate(want):
                dim = _shard_dim(name, i)
                w = w if dim is None else w.chunk(TP, dim=dim)[rank]
                got = result[name][i]
                torch.testing.assert_close(got, w, **_tolerance(name, w), msg=lambda m: f"{name}[{i}] rank {rank}: {m}")


@pytest.mark.parity
def test_ops_tp2_match_reference():
    _compare(run_distributed(_tp_checks, TP, "world"))


@pytest.mark.parity
def test_ops_tp2_default_group_is_megatron_tp_group():
    _compare(run_distributed(_tp_checks, TP, "megatron", tp=TP))
