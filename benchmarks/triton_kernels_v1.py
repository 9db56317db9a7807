"""The previous Triton divergence kernels (megatron_xopd.ops.triton_kernels as of 2026-11-26, unchanged), kept only
as the baseline that ``benchmarks/gpu_check.py`` times next to the current ones (its ``bandwidth`` section).

One program per row streams the row's local vocabulary shard in blocks: an online (running-max) pass for the
forward statistics, and one pass writing the gradient. Inputs are read in their own dtype and math is float32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_KIND_IDS = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}
_MAX_BLOCK = 4096


def _block(n_cols: int) -> int:
    return min(_MAX_BLOCK, triton.next_power_of_2(max(n_cols, 1)))


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


@triton.jit
def _log_mixture(log_q, log_p, log_beta, log_1mbeta):
    a = log_p + log_beta
    b = log_q + log_1mbeta
    hi = tl.maximum(a, b)
    return hi + tl.log(1.0 + tl.exp(-tl.abs(a - b)))


@triton.jit
def _stats_kernel(
    s_ptr, t_ptr, out_ptr, s_stride, t_stride, n_cols, inv_temp, KIND: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    s_ptr += row * s_stride
    t_ptr += row * t_stride
    m_s = float("-inf")
    m_t = float("-inf")
    z_s = 0.0
    z_t = 0.0
    acc = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_cols
        s = tl.load(s_ptr + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
        t = tl.load(t_ptr + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
        new_s = tl.maximum(m_s, tl.max(tl.where(valid, s, float("-inf")), axis=0))
        new_t = tl.maximum(m_t, tl.max(tl.where(valid, t, float("-inf")), axis=0))
        alpha_s = tl.exp(m_s - new_s)
        alpha_t = tl.exp(m_t - new_t)
        e_s = tl.where(valid, tl.exp(s - new_s), 0.0)
        e_t = tl.where(valid, tl.exp(t - new_t), 0.0)
        z_s = z_s * alpha_s + tl.sum(e_s, axis=0)
        z_t = z_t * alpha_t + tl.sum(e_t, axis=0)
        if KIND == 0:
            acc = acc * alpha_s + tl.sum(e_s * (s - t), axis=0)
        elif KIND == 1:
            acc = acc * alpha_t + tl.sum(e_t * (t - s), axis=0)
        m_s = new_s
        m_t = new_t
    out_ptr += row * 5
    tl.store(out_ptr, m_s)
    tl.store(out_ptr + 1, m_t)
    tl.store(out_ptr + 2, z_s)
    tl.store(out_ptr + 3, z_t)
    tl.store(out_ptr + 4, acc)


@triton.jit
def _log_probs(s_ptr, t_ptr, state_ptr, cols, valid, inv_temp):
    # (x - max) - log Z, as the PyTorch path: exact where x is the max, whatever the logits' magnitude.
    s = tl.load(s_ptr + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
    t = tl.load(t_ptr + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
    log_q = (s - tl.load(state_ptr)) - tl.load(state_ptr + 1)
    log_p = (t - tl.load(state_ptr + 2)) - tl.load(state_ptr + 3)
    return log_q, log_p


@triton.jit
def _jsd_kernel(
    s_ptr, t_ptr, state_ptr, out_ptr, s_stride, t_stride, n_cols, inv_temp, beta, log_beta, log_1mbeta,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_ptr += row * s_stride
    t_ptr += row * t_stride
    state_ptr += row * 5
    acc_j = 0.0
    acc_c = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_cols
        log_q, log_p = _log_probs(s_ptr, t_ptr, state_ptr, cols, valid, inv_temp)
        log_m = _log_mixture(log_q, log_p, log_beta, log_1mbeta)
        kl_q = tl.exp(log_q) * (log_q - log_m)
        kl_p = tl.exp(log_p) * (log_p - log_m)
        acc_j += tl.sum(tl.where(valid, beta * kl_p + (1.0 - beta) * kl_q, 0.0), axis=0)
        acc_c += tl.sum(tl.where(valid, kl_q, 0.0), axis=0)
    tl.store(out_ptr + row * 2, acc_j)
    tl.store(out_ptr + row * 2 + 1, acc_c)


@triton.jit
def _grad_kernel(
    s_ptr, t_ptr, state_ptr, g_ptr, out_ptr, s_stride, t_stride, out_stride, n_cols, inv_temp, beta, log_beta,
    log_1mbeta, KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_ptr += row * s_stride
    t_ptr += row * t_stride
    out_ptr += row * out_stride
    state_ptr += row * 5
    stat = tl.load(state_ptr + 4)
    g = tl.load(g_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_cols
        log_q, log_p = _log_probs(s_ptr, t_ptr, state_ptr, cols, valid, inv_temp)
        q = tl.exp(log_q)
        if KIND == 0:
            grad = q * (log_q - log_p - stat)
        elif KIND == 1:
            grad = q - tl.exp(log_p)
        else:
            log_m = _log_mixture(log_q, log_p, log_beta, log_1mbeta)
            grad = (1.0 - beta) * q * (log_q - log_m - stat)
        tl.store(out_ptr + cols, (grad * g).to(out_ptr.dtype.element_ty), mask=valid)


def _log_betas(beta: float) -> tuple[float, float]:
    # Only JSD (0 < beta < 1) uses them; the clamps keep the other kinds' unused arguments finite.
    return math.log(max(beta, 1e-30)), math.log(max(1.0 - beta, 1e-30))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def divergence_stats(s: torch.Tensor, t: torch.Tensor, inv_temp: float, kind: str) -> torch.Tensor:
    s, t = _rows(s), _rows(t)
    n, n_cols = s.shape
    out = torch.empty(n, 5, dtype=torch.float32, device=s.device)
    block = _block(n_cols)
    _stats_kernel[(n,)](
        s, t, out, s.stride(0), t.stride(0), n_cols, inv_temp, KIND=_KIND_IDS[kind], BLOCK=block,
        num_warps=_num_warps(block),
    )
    return out


def jsd_terms(s: torch.Tensor, t: torch.Tensor, inv_temp: float, state: torch.Tensor, beta: float) -> torch.Tensor:
    s, t = _rows(s), _rows(t)
    n, n_cols = s.shape
    out = torch.empty(n, 2, dtype=torch.float32, device=s.device)
    block = _block(n_cols)
    _jsd_kernel[(n,)](
        s, t, state.contiguous(), out, s.stride(0), t.stride(0), n_cols, inv_temp, beta, *_log_betas(beta),
        BLOCK=block, num_warps=_num_warps(block),
    )
    return out


def divergence_grad(
    s: torch.Tensor,
    t: torch.Tensor,
    inv_temp: float,
    state: torch.Tensor,
    gscale: torch.Tensor,
    kind: str,
    beta: float,
    out: torch.Tensor,
) -> None:
    s, t = _rows(s), _rows(t)
    target = _rows(out)
    n, n_cols = s.shape
    block = _block(n_cols)
    _grad_kernel[(n,)](
        s, t, state.contiguous(), gscale.contiguous(), target, s.stride(0), t.stride(0), target.stride(0), n_cols,
        inv_temp, beta, *_log_betas(beta), KIND=_KIND_IDS[kind], BLOCK=block, num_warps=_num_warps(block),
    )
    if target is not out:
        out.copy_(target)
