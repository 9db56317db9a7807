"""Per-chunk math of the dense divergences: the PyTorch reference (also the CPU path) and the dispatch to Triton.

Each function sees one chunk of rows of the local vocabulary shard, ``s`` (student) and ``t`` (teacher) of shape
[c, V_valid] in any float dtype, and works in ``dtype`` after multiplying by ``inv_temp``. Row statistics are
local to the shard; ``lse_s``/``lse_t`` passed in are the global log-normalisers.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType

import torch

REVERSE_KL, FORWARD_KL, JSD = "reverse_kl", "forward_kl", "jsd"
KINDS = (REVERSE_KL, FORWARD_KL, JSD)


@functools.cache
def _triton() -> ModuleType | None:
    try:
        from megatron_xopd.ops import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def _use_triton(x: torch.Tensor, dtype: torch.dtype) -> bool:
    return x.is_cuda and dtype == torch.float32 and _triton() is not None


def scaled(x: torch.Tensor, inv_temp: float, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in the compute dtype, times ``inv_temp`` (a copy unless both are no-ops)."""
    x = x.to(dtype)
    return x * inv_temp if inv_temp != 1.0 else x


def divergence_stats(
    s: torch.Tensor, t: torch.Tensor, inv_temp: float, kind: str, dtype: torch.dtype
) -> torch.Tensor:
    """Local row statistics [c, 5]: ``max s``, ``max t``, ``sum exp(s - max s)``, ``sum exp(t - max t)`` and the
    expectation term: ``sum exp(s - max s) (s - t)`` for reverse KL, ``sum exp(t - max t) (t - s)`` for forward
    KL, 0 for JSD (which needs the global normalisers first, see :func:`jsd_terms`)."""
    if _use_triton(s, dtype):
        return _triton().divergence_stats(s, t, inv_temp, kind)
    s, t = scaled(s, inv_temp, dtype), scaled(t, inv_temp, dtype)
    m_s, m_t = s.amax(dim=1), t.amax(dim=1)
    e_s = (s - m_s[:, None]).exp_()
    e_t = (t - m_t[:, None]).exp_()
    z_s, z_t = e_s.sum(dim=1), e_t.sum(dim=1)
    if kind == REVERSE_KL:
        expect = e_s.mul_(s - t).sum(dim=1)
    elif kind == FORWARD_KL:
        expect = e_t.mul_(t - s).sum(dim=1)
    else:
        expect = torch.zeros_like(z_s)
    return torch.stack([m_s, m_t, z_s, z_t, expect], dim=1)


def log_mixture(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    """log M with M = beta p + (1 - beta) q (TRL's GKD convention), for 0 < beta < 1."""
    return torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))


def jsd_terms(
    s: torch.Tensor,
    t: torch.Tensor,
    inv_temp: float,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    beta: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Local sums [c, 2]: J = sum beta p (log p - log M) + (1 - beta) q (log q - log M), and
    C = sum q (log q - log M) = KL(q || M) over this shard."""
    if _use_triton(s, dtype):
        return _triton().jsd_terms(s, t, inv_temp, lse_s, lse_t, beta)
    log_q = scaled(s, inv_temp, dtype) - lse_s[:, None]
    log_p = scaled(t, inv_temp, dtype) - lse_t[:, None]
    log_m = log_mixture(log_q, log_p, beta)
    kl_q = log_q.exp() * (log_q - log_m)
    kl_p = log_p.exp() * (log_p - log_m)
    c = kl_q.sum(dim=1)
    return torch.stack([beta * kl_p.sum(dim=1) + (1.0 - beta) * c, c], dim=1)


def divergence_grad(
    s: torch.Tensor,
    t: torch.Tensor,
    inv_temp: float,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    stat: torch.Tensor,
    gscale: torch.Tensor,
    kind: str,
    beta: float,
    out: torch.Tensor,
) -> None:
    """Write the gradient w.r.t. the (scaled) student logits into ``out`` [c, V_valid] (any float dtype).

    ``gscale`` [c] is the upstream gradient times ``inv_temp``; ``stat`` [c] is the divergence for reverse KL and
    C = KL(q || M) for JSD (unused for forward KL). Needs no communication.
    """
    if _use_triton(s, dtype := stat.dtype):
        _triton().divergence_grad(s, t, inv_temp, lse_s, lse_t, stat, gscale, kind, beta, out)
        return
    log_q = scaled(s, inv_temp, dtype) - lse_s[:, None]
    log_p = scaled(t, inv_temp, dtype) - lse_t[:, None]
    if kind == REVERSE_KL:
        grad = log_q.exp() * (log_q - log_p).sub_(stat[:, None])
    elif kind == FORWARD_KL:
        grad = log_q.exp_().sub_(log_p.exp_())
    else:
        log_m = log_mixture(log_q, log_p, beta)
        grad = log_q.exp() * (log_q - log_m).sub_(stat[:, None]).mul_(1.0 - beta)
    out.copy_(grad.mul_(gscale[:, None]))
