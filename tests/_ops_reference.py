"""Single-process float64 references for the vocab-parallel ops: plain ``log_softmax`` over the full vocabulary."""

from __future__ import annotations

import math

import torch


def log_softmax(logits: torch.Tensor, temperature: float = 1.0, vocab_size: int | None = None) -> torch.Tensor:
    return torch.log_softmax(logits[:, :vocab_size].double() / temperature, dim=-1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def bucket_divergence(log_q: torch.Tensor, log_p: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(log_q, log_p)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(log_p, log_q)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    log_q = log_softmax(student, temperature, vocab_size)
    log_p = log_softmax(teacher, temperature, vocab_size)
    value = bucket_divergence(log_q, log_p, kind, beta)
    return value if mask is None else value * mask


def topk_divergence(
    student: torch.Tensor,
    ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    log_q = log_softmax(student, temperature, vocab_size)
    log_q_ids = log_q.gather(1, ids)
    log_q_tail = log_q.scatter(1, ids, -math.inf).logsumexp(-1, keepdim=True)
    log_p = teacher_logprobs.double()
    log_p_tail = torch.log1p(-log_p.exp().sum(-1, keepdim=True))
    value = bucket_divergence(torch.cat([log_q_ids, log_q_tail], 1), torch.cat([log_p, log_p_tail], 1), kind, beta)
    return value if mask is None else value * mask


def logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, vocab_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    log_q = log_softmax(logits, temperature, vocab_size)
    return log_q.gather(1, targets[:, None]).squeeze(1), -(log_q.exp() * log_q).sum(-1)


def make_logits(n: int, v: int, seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded float64 student and teacher logits [n, v]."""
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, v, generator=gen, dtype=torch.float64) * scale,
        torch.randn(n, v, generator=gen, dtype=torch.float64) * scale,
    )


def teacher_topk(teacher: torch.Tensor, k: int, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k ids and log-probs over the true vocabulary."""
    log_p, ids = log_softmax(teacher, 1.0, vocab_size).topk(k, dim=-1)
    return ids, log_p


def reference_grad(fn, x: torch.Tensor, upstream: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Value of ``fn(x)`` and the gradient of ``(fn(x) * upstream).sum()`` w.r.t. ``x``, in float64."""
    x = x.detach().double().requires_grad_()
    value = fn(x)
    weights = torch.ones_like(value) if upstream is None else upstream.double()
    (grad,) = torch.autograd.grad((value * weights).sum(), x)
    return value.detach(), grad
