"""Per-chunk math of the dense divergences: the PyTorch reference (also the CPU path) and the dispatch to Triton.

Each function sees one chunk of rows of the local vocabulary shard, ``s`` (student) and ``t`` (teacher) of shape
[c, V_valid] in any float dtype, and works in the compute dtype after multiplying by ``inv_temp``. The row
statistics it returns are local to the shard; the ``state`` it is given holds global ones.
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
        from . import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def _use_triton(x: torch.Tensor, dtype: torch.dtype) -> bool:
    return x.is_cuda and dtype == torch.float32 and _triton() is not None


class Workspace:
    """Scratch buffers that the PyTorch path reuses from chunk to chunk.

    Fresh temporaries per chunk would each be a new large allocation, which on CPU is mmap-ed and page-faulted in
    anew every time: as costly as the math itself.
    """

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def get(self, slot: int, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor; the same memory on every call with ``slot`` (grown when too small)."""
        n = math.prod(shape)
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[slot] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def like(self, slot: int, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`get` shaped like ``x``, on its device."""
        return self.get(slot, x.shape, dtype, x.device)


def scaled(x: torch.Tensor, inv_temp: float, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` in the compute dtype, times ``inv_temp``: ``x`` itself if both are no-ops, else written to ``out``
    (a new tensor without it). The product is taken in ``dtype``, not in ``x``'s dtype."""
    if x.dtype != dtype:
        x = x.to(dtype) if out is None else out.copy_(x)
    if inv_temp == 1.0:
        return x
    return x * inv_temp if out is None else torch.mul(x, inv_temp, out=out)


def log_mixture(
    log_q: torch.Tensor,
    log_p: torch.Tensor,
    beta: float,
    out: torch.Tensor | None = None,
    tmp: torch.Tensor | None = None,
) -> torch.Tensor:
    """log M with M = beta p + (1 - beta) q (TRL's GKD convention), for 0 < beta < 1. Differentiable, or, with
    buffers ``out`` and ``tmp`` shaped like the inputs, written to ``out``."""
    if out is None:
        return torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    a = torch.add(log_p, math.log(beta), out=out)
    return torch.logaddexp(a, torch.add(log_q, math.log1p(-beta), out=tmp), out=a)


def divergence_stats(
    s: torch.Tensor,
    t: torch.Tensor,
    inv_temp: float,
    kind: str,
    dtype: torch.dtype,
    work: Workspace,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Local row statistics [c, 5]: ``max s``, ``max t``, ``sum exp(s - max s)``, ``sum exp(t - max t)`` and the
    expectation term: ``sum exp(s - max s) (s - t)`` for reverse KL, ``sum exp(t - max t) (t - s)`` for forward
    KL, 0 for JSD (which needs the global normalisers first, see :func:`jsd_terms`). ``rows`` [c], when given,
    selects the rows of ``s`` and ``t`` (the Triton kernels index them; no gathered copy)."""
    if _use_triton(s, dtype):
        return _triton().divergence_stats(s, t, inv_temp, kind, rows)
    s, t = _gather(s, t, rows)
    s = _scaled_in(work, 0, s, inv_temp, dtype)
    t = _scaled_in(work, 1, t, inv_temp, dtype)
    m_s, m_t = s.amax(dim=1), t.amax(dim=1)
    # Two [c, V] buffers: the exponentials of the side whose expectation is not taken are summed, then the
    # buffer is reused for the difference.
    a, b = work.like(2, s, dtype), work.like(3, s, dtype)
    e_s = torch.sub(s, m_s[:, None], out=a).exp_()
    z_s = e_s.sum(dim=1)
    e_t = torch.sub(t, m_t[:, None], out=b).exp_()
    z_t = e_t.sum(dim=1)
    if kind == REVERSE_KL:
        expect = e_s.mul_(torch.sub(s, t, out=b)).sum(dim=1)
    elif kind == FORWARD_KL:
        expect = e_t.mul_(torch.sub(t, s, out=a)).sum(dim=1)
    else:
        expect = torch.zeros_like(z_s)
    return torch.stack([m_s, m_t, z_s, z_t, expect], dim=1)


def _scaled_in(work: Workspace, slot: int, x: torch.Tensor, inv_temp: float, dtype: torch.dtype) -> torch.Tensor:
    """:func:`scaled` into workspace ``slot``, which is only allocated when a copy is needed."""
    if x.dtype == dtype and inv_temp == 1.0:
        return x
    return scaled(x, inv_temp, dtype, work.like(slot, x, dtype))


def _gather(s: torch.Tensor, t: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return (s, t) if rows is None else (s[rows], t[rows])


def _log_probs(
    s, t, inv_temp: float, state: torch.Tensor, work: Workspace, log_q: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log q and log p, in workspace slots 2 and 3 (the statistics pass's two buffers) or log q in ``log_q``.
    Taken as (x - max) - log Z rather than x - lse: exact where x is the max, whatever the logits' magnitude."""
    dtype = state.dtype
    m_s, log_z_s, m_t, log_z_t = (state[:, i, None] for i in range(4))
    log_q = work.like(2, s, dtype) if log_q is None else log_q
    log_p = work.like(3, t, dtype)
    torch.sub(scaled(s, inv_temp, dtype, log_q), m_s, out=log_q).sub_(log_z_s)
    torch.sub(scaled(t, inv_temp, dtype, log_p), m_t, out=log_p).sub_(log_z_t)
    return log_q, log_p


def jsd_terms(
    s: torch.Tensor,
    t: torch.Tensor,
    inv_temp: float,
    state: torch.Tensor,
    beta: float,
    work: Workspace,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Local sums [c, 2]: J = sum beta p (log p - log M) + (1 - beta) q (log q - log M), and
    C = sum q (log q - log M) = KL(q || M) over this shard. ``state`` and ``rows`` are as in
    :func:`divergence_grad`."""
    if _use_triton(s, state.dtype):
        return _triton().jsd_terms(s, t, inv_temp, state, beta, rows)
    s, t = _gather(s, t, rows)
    log_q, log_p = _log_probs(s, t, inv_temp, state, work)
    log_m = log_mixture(log_q, log_p, beta, work.like(4, s, state.dtype), work.like(0, s, state.dtype))
    kl_q = torch.sub(log_q, log_m, out=work.like(0, s, state.dtype)).mul_(log_q.exp_())  # q (log q - log M)
    kl_p = torch.sub(log_p, log_m, out=log_m).mul_(log_p.exp_())  # p (log p - log M)
    c = kl_q.sum(dim=1)
    return torch.stack([beta * kl_p.sum(dim=1) + (1.0 - beta) * c, c], dim=1)


def divergence_grad(
    s: torch.Tensor,
    t: torch.Tensor,
    inv_temp: float,
    state: torch.Tensor,
    gscale: torch.Tensor | float,
    kind: str,
    beta: float,
    out: torch.Tensor,
    work: Workspace,
    rows: torch.Tensor | None = None,
) -> None:
    """Write the gradient w.r.t. the (scaled) student logits into ``out`` (any float dtype; the same rows as ``s``
    and ``t``, and at least their V_valid columns: the columns past them are padding and get zeros).

    ``state`` [c, 5] holds the global (max s, log Z_s, max t, log Z_t) and a statistic: the divergence for
    reverse KL, C = KL(q || M) for JSD (unused for forward KL); its dtype is the compute dtype. ``gscale`` [c] is
    the upstream gradient times ``inv_temp`` (one number for every row: a float). ``rows`` [c], when given, are
    the rows of ``s``, ``t`` and ``out`` the chunk is; only those rows of ``out`` are written. Needs no
    communication.
    """
    if _use_triton(s, state.dtype):
        _triton().divergence_grad(s, t, inv_temp, state, gscale, kind, beta, out, rows)
        return
    s, t = _gather(s, t, rows)
    # The gradient is built in ``out`` itself when it has the chunk's shape and the compute dtype (no copy; ``out``
    # may be ``s``, which is read first).
    direct = rows is None and out.dtype == state.dtype and out.shape == s.shape
    g = gscale[:, None] if isinstance(gscale, torch.Tensor) else gscale
    if kind == REVERSE_KL:
        grad = _reverse_kl_grad(s, t, inv_temp, state, g, work, out if direct else None)
    else:
        grad = _mixture_grad(s, t, inv_temp, state, g, kind, beta, work, out if direct else None)
    if direct:
        return
    valid = s.shape[1]
    if rows is None:
        out[:, :valid].copy_(grad)
        out[:, valid:].zero_()
    else:
        out[rows, :valid] = grad.to(out.dtype)
        out[rows, valid:] = 0


def _reverse_kl_grad(s, t, inv_temp: float, state: torch.Tensor, g, work: Workspace, out: torch.Tensor | None):
    """q (log q - log p - KL) g, written as exp((s - m_s) - log Z_s) ((s - t) - c) g with one row constant
    c = (m_s - m_t) + (log Z_s - log Z_t + KL): seven passes over the chunk and two buffers (or ``out``). The
    maxima are subtracted before anything small is added, as in :func:`_log_probs`: large logits lose no digits."""
    dtype = state.dtype
    s_ = _scaled_in(work, 0, s, inv_temp, dtype)
    t_ = _scaled_in(work, 1, t, inv_temp, dtype)
    m_s, log_z_s, m_t, log_z_t, kl = (state[:, i, None] for i in range(5))
    row = (m_s - m_t) + ((log_z_s - log_z_t) + kl)
    coef = torch.sub(s_, t_, out=work.like(3, s_, dtype)).sub_(row).mul_(g)  # before ``out`` (maybe s) is written
    q = torch.sub(s_, m_s, out=work.like(2, s_, dtype) if out is None else out).sub_(log_z_s).exp_()
    return q.mul_(coef)


def _mixture_grad(s, t, inv_temp: float, state: torch.Tensor, g, kind: str, beta: float, work: Workspace,
                  out: torch.Tensor | None):
    """Forward KL (q - p) and JSD ((1 - beta) q (log q - log M - C)) gradients, times ``g``."""
    log_q, log_p = _log_probs(s, t, inv_temp, state, work, out)
    stat = state[:, 4, None]
    if kind == FORWARD_KL:
        grad = log_q.exp_().sub_(log_p.exp_())  # q - p
    else:
        log_m = log_mixture(log_q, log_p, beta, work.like(4, s, state.dtype), log_p)
        coef = torch.sub(log_q, log_m, out=log_m).sub_(stat).mul_(1.0 - beta)  # (1 - beta)(log q - log M - C)
        grad = log_q.exp_().mul_(coef)
    return grad.mul_(g)


def scale_rows(x: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """``x[rows[i]] *= g[i]`` in place (``x[i] *= g[i]`` without ``rows``): a gradient written with a unit upstream
    gradient, scaled by the real one. The Triton kernel leaves rows with ``g == 1`` untouched."""
    if _use_triton(x, torch.float32):
        _triton().scale_rows(x, g, rows)
    elif rows is None:
        x.mul_(g[:, None])
    else:
        x[rows] = (x[rows] * g[:, None]).to(x.dtype)
