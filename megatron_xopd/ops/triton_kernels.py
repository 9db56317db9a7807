"""Triton kernels for the divergence math of :mod:`megatron_xopd.ops.kernels` (same math, same row statistics).

One program per row streams the row's local vocabulary shard in blocks of ``BLOCK`` columns:

- ``divergence_stats``: one pass over student and teacher. The running maxima are block-level scalars, the
  sums (``sum exp``, the expectation term) are per-lane vectors rescaled by one scalar ``exp`` per block and
  reduced once at the end: two reductions per block instead of five, one ``exp`` per element and input.
- ``jsd_terms``: the JSD's second pass (it needs the global normalisers), per-lane sums as well.
- ``divergence_grad``: one pass writing the gradient w.r.t. the student logits, times a per-row scale, in the
  output's dtype (bf16 for bf16 logits); the padding columns past the shard's real tokens are written as zeros, so
  the gradient needs no zero fill first.
- ``scale_rows``: multiplies gradient rows by the upstream gradient in place, skipping rows whose factor is 1 (the
  gradient written in the forward, see ``grad_in_forward`` in :func:`~megatron_xopd.ops.vocab_parallel_divergence`).

Every kernel takes an optional index of the rows to process (masked tokens), so a mask costs no gather copy.
Inputs are read in their own dtype and the math is float32. On CUDA the block size and warp count are autotuned
per vocabulary width (first call, once per process); on CPU tensors (``TRITON_INTERPRET=1``, the tests) a small
fixed block makes tiny test vocabularies span several blocks, the last one partial.

The autotuner runs every config several times on the caller's buffers, so no tuned launch may change what a later
run reads: each autotuner restores the buffer its kernel writes (``restore_value``), except the gradient kernel's
out-of-place variant, chosen only when its output shares no memory with an input (a write-only buffer that every
run fills with the same values; restoring it would clone the whole [N, V] gradient). The fused-linear ops write the
gradient over the student logits, which the gradient kernel reads: that call goes through ``grad_inplace``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_KIND_IDS = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}
# (BLOCK, num_warps) tried by the autotuner on CUDA (8 to 16 elements per thread); each is one more compilation.
_TUNE = ((1024, 4), (2048, 8), (4096, 8), (8192, 16))
INTERPRET_BLOCK = 32  # the block on CPU tensors (the interpreter), where nothing is tuned
_SCALE_BLOCK, _SCALE_WARPS = 4096, 8  # scale_rows is in place, so it cannot be autotuned (runs would compound)


def _tuned(kernel: triton.JITFunction, key: list[str], restore: list[str]) -> triton.runtime.Autotuner:
    """``kernel`` autotuned over ``_TUNE`` per value of ``key`` (and per dtype of its tensors); the arguments
    ``restore`` are copied before and written back after every timed run (see the module's note on tuning)."""
    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in _TUNE]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _fitting},
                           restore_value=restore or None)(kernel)


def _fitting(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs whose block is not wider than the row needs (a short row compiles and times only one)."""
    widest = max(_TUNE[0][0], triton.next_power_of_2(named_args["n_cols"]))
    return [c for c in configs if c.kwargs["BLOCK"] <= widest]


@triton.jit
def _row_of(pid, rows_ptr, HAS_ROWS: tl.constexpr):
    row = pid.to(tl.int64)
    if HAS_ROWS:
        row = tl.load(rows_ptr + pid).to(tl.int64)
    return row


@triton.jit
def _log_mixture(log_q, log_p, log_beta, log_1mbeta):
    a = log_p + log_beta
    b = log_q + log_1mbeta
    hi = tl.maximum(a, b)
    return hi + tl.log(1.0 + tl.exp(-tl.abs(a - b)))


@triton.jit
def _stats_kernel(
    s_ptr, t_ptr, rows_ptr, out_ptr, s_stride, t_stride, n_cols, inv_temp,
    KIND: tl.constexpr, HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = _row_of(pid, rows_ptr, HAS_ROWS)
    s_ptr += row * s_stride
    t_ptr += row * t_stride
    m_s = float("-inf")
    m_t = float("-inf")
    z_s = tl.zeros([BLOCK], dtype=tl.float32)
    z_t = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_cols
        s = tl.load(s_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
        t = tl.load(t_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
        new_s = tl.maximum(m_s, tl.max(s, axis=0))
        new_t = tl.maximum(m_t, tl.max(t, axis=0))
        alpha_s = tl.exp(m_s - new_s)
        alpha_t = tl.exp(m_t - new_t)
        e_s = tl.exp(s - new_s)  # 0 on the masked lanes (-inf)
        e_t = tl.exp(t - new_t)
        z_s = z_s * alpha_s + e_s
        z_t = z_t * alpha_t + e_t
        if KIND == 0:
            acc = acc * alpha_s + e_s * tl.where(valid, s - t, 0.0)
        elif KIND == 1:
            acc = acc * alpha_t + e_t * tl.where(valid, t - s, 0.0)
        m_s = new_s
        m_t = new_t
    out_ptr += pid.to(tl.int64) * 5
    tl.store(out_ptr, m_s)
    tl.store(out_ptr + 1, m_t)
    tl.store(out_ptr + 2, tl.sum(z_s, axis=0))
    tl.store(out_ptr + 3, tl.sum(z_t, axis=0))
    tl.store(out_ptr + 4, tl.sum(acc, axis=0))


@triton.jit
def _log_probs(s_ptr, t_ptr, cols, valid, inv_temp, m_s, log_z_s, m_t, log_z_t):
    # (x - max) - log Z, as the PyTorch path: exact where x is the max, whatever the logits' magnitude.
    s = tl.load(s_ptr + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
    t = tl.load(t_ptr + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
    return (s - m_s) - log_z_s, (t - m_t) - log_z_t


@triton.jit
def _jsd_kernel(
    s_ptr, t_ptr, rows_ptr, state_ptr, out_ptr, s_stride, t_stride, n_cols, inv_temp, beta, log_beta, log_1mbeta,
    HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = _row_of(pid, rows_ptr, HAS_ROWS)
    s_ptr += row * s_stride
    t_ptr += row * t_stride
    state_ptr += pid.to(tl.int64) * 5
    m_s, log_z_s = tl.load(state_ptr), tl.load(state_ptr + 1)
    m_t, log_z_t = tl.load(state_ptr + 2), tl.load(state_ptr + 3)
    acc_j = tl.zeros([BLOCK], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_cols
        log_q, log_p = _log_probs(s_ptr, t_ptr, cols, valid, inv_temp, m_s, log_z_s, m_t, log_z_t)
        log_m = _log_mixture(log_q, log_p, log_beta, log_1mbeta)
        kl_q = tl.where(valid, tl.exp(log_q) * (log_q - log_m), 0.0)
        kl_p = tl.where(valid, tl.exp(log_p) * (log_p - log_m), 0.0)
        acc_j += beta * kl_p + (1.0 - beta) * kl_q
        acc_c += kl_q
    out_ptr += pid.to(tl.int64) * 2
    tl.store(out_ptr, tl.sum(acc_j, axis=0))
    tl.store(out_ptr + 1, tl.sum(acc_c, axis=0))


@triton.jit
def _grad_kernel(
    s_ptr, t_ptr, rows_ptr, state_ptr, g_ptr, out_ptr, s_stride, t_stride, out_stride, n_cols, n_out_cols, inv_temp,
    alpha, beta, log_beta, log_1mbeta, KIND: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_G: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = _row_of(pid, rows_ptr, HAS_ROWS)
    s_ptr += row * s_stride
    t_ptr += row * t_stride
    out_ptr += row * out_stride
    state_ptr += pid.to(tl.int64) * 5
    m_s, log_z_s = tl.load(state_ptr), tl.load(state_ptr + 1)
    m_t, log_z_t = tl.load(state_ptr + 2), tl.load(state_ptr + 3)
    stat = tl.load(state_ptr + 4)
    scale = alpha
    if HAS_G:
        scale = scale * tl.load(g_ptr + pid)
    if KIND == 2:
        scale = scale * (1.0 - beta)
    for start in range(0, n_out_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_cols
        log_q, log_p = _log_probs(s_ptr, t_ptr, cols, valid, inv_temp, m_s, log_z_s, m_t, log_z_t)
        q = tl.exp(log_q)
        if KIND == 0:
            grad = q * (log_q - log_p - stat)
        elif KIND == 1:
            grad = q - tl.exp(log_p)
        else:
            grad = q * (log_q - _log_mixture(log_q, log_p, log_beta, log_1mbeta) - stat)
        grad = tl.where(valid, grad * scale, 0.0)  # the padding columns get zeros
        tl.store(out_ptr + cols, grad.to(out_ptr.dtype.element_ty), mask=cols < n_out_cols)


@triton.jit
def _scale_kernel(x_ptr, rows_ptr, g_ptr, stride, n_cols, HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = _row_of(pid, rows_ptr, HAS_ROWS)
    x_ptr += row * stride
    g = tl.load(g_ptr + pid)
    # A factor of exactly 1 (the upstream of a plain sum) leaves the row as it is: no read, no write.
    for start in range(0, tl.where(g != 1.0, n_cols, 0), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_cols
        x = tl.load(x_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        tl.store(x_ptr + cols, (x * g).to(x_ptr.dtype.element_ty), mask=valid)


_KERNELS = {"stats": _stats_kernel, "jsd": _jsd_kernel, "grad": _grad_kernel, "grad_inplace": _grad_kernel}
_GRAD_KEY = ["n_cols", "KIND", "HAS_G"]
_TUNED = {
    "stats": _tuned(_stats_kernel, ["n_cols", "KIND"], ["out_ptr"]),
    "jsd": _tuned(_jsd_kernel, ["n_cols"], ["out_ptr"]),
    "grad": _tuned(_grad_kernel, _GRAD_KEY, []),  # out shares no memory with s, t (divergence_grad checks)
    "grad_inplace": _tuned(_grad_kernel, _GRAD_KEY, ["out_ptr"]),  # out overlaps s or t: restored per run
}


def _autotuned(x: torch.Tensor) -> bool:
    """Whether launches on ``x`` go through the autotuners: compiled kernels (CUDA), not the interpreter."""
    return x.is_cuda


def _launch(name: str, x: torch.Tensor, n: int, *args, **kwargs) -> None:
    """``n`` programs of kernel ``name``: autotuned on CUDA, a fixed small block on CPU (the interpreter)."""
    if n == 0:
        return
    if _autotuned(x):
        _TUNED[name][(n,)](*args, **kwargs)
    else:
        _KERNELS[name][(n,)](*args, **kwargs, BLOCK=INTERPRET_BLOCK)


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are views of one storage (conservative: any two views of it count)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _log_betas(beta: float) -> tuple[float, float]:
    # Only JSD (0 < beta < 1) uses them; the clamps keep the other kinds' unused arguments finite.
    return math.log(max(beta, 1e-30)), math.log(max(1.0 - beta, 1e-30))


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _selection(s: torch.Tensor, rows: torch.Tensor | None) -> tuple[int, torch.Tensor, bool]:
    """(programs, row-index pointer argument, whether rows are indexed): ``rows`` indexes the rows of ``s``."""
    if rows is None:
        return s.shape[0], s, False
    return rows.numel(), rows.contiguous(), True


def divergence_stats(
    s: torch.Tensor, t: torch.Tensor, inv_temp: float, kind: str, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Local row statistics [n, 5] (float32) of the rows ``rows`` of ``s``/``t`` (all rows when ``None``)."""
    s, t = _rows_view(s), _rows_view(t)
    n, rows_arg, has_rows = _selection(s, rows)
    out = torch.empty(n, 5, dtype=torch.float32, device=s.device)
    _launch("stats", s, n, s, t, rows_arg, out, s.stride(0), t.stride(0), s.shape[1], inv_temp,
            KIND=_KIND_IDS[kind], HAS_ROWS=has_rows)
    return out


def jsd_terms(
    s: torch.Tensor,
    t: torch.Tensor,
    inv_temp: float,
    state: torch.Tensor,
    beta: float,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Local JSD sums [n, 2] (J, C) of the rows ``rows``; ``state`` [n, 5] holds their global statistics."""
    s, t = _rows_view(s), _rows_view(t)
    n, rows_arg, has_rows = _selection(s, rows)
    out = torch.empty(n, 2, dtype=torch.float32, device=s.device)
    _launch("jsd", s, n, s, t, rows_arg, state.contiguous(), out, s.stride(0), t.stride(0), s.shape[1],
            inv_temp, beta, *_log_betas(beta), HAS_ROWS=has_rows)
    return out


def divergence_grad(
    s: torch.Tensor,
    t: torch.Tensor,
    inv_temp: float,
    state: torch.Tensor,
    gscale: torch.Tensor | float,
    kind: str,
    beta: float,
    out: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> None:
    """Write the gradient into rows ``rows`` of ``out`` (same rows as ``s``; its columns past ``s``'s are padding
    and get zeros). ``gscale`` is the per-row upstream gradient times ``inv_temp`` [n], or one number for all.
    ``out`` may be ``s`` itself (each block is read before it is written)."""
    s, t = _rows_view(s), _rows_view(t)
    n, rows_arg, has_rows = _selection(s, rows)
    if out.stride(-1) != 1:
        raise ValueError("divergence_grad writes rows of unit column stride")
    per_row = isinstance(gscale, torch.Tensor)
    g_arg = gscale.contiguous() if per_row else state
    name = "grad_inplace" if _shares_memory(out, s) or _shares_memory(out, t) else "grad"
    _launch(name, s, n, s, t, rows_arg, state.contiguous(), g_arg, out, s.stride(0), t.stride(0), out.stride(0),
            s.shape[1], out.shape[1], inv_temp, 1.0 if per_row else float(gscale), beta, *_log_betas(beta),
            KIND=_KIND_IDS[kind], HAS_ROWS=has_rows, HAS_G=per_row)


def scale_rows(x: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """``x[rows[i]] *= g[i]`` in place (``x[i] *= g[i]`` without ``rows``); rows with ``g == 1`` are not touched."""
    if x.stride(-1) != 1:
        raise ValueError("scale_rows scales rows of unit column stride")
    n, rows_arg, has_rows = _selection(x, rows)
    if n == 0:
        return
    block = _SCALE_BLOCK if x.is_cuda else INTERPRET_BLOCK
    _scale_kernel[(n,)](x, rows_arg, g.to(torch.float32).contiguous(), x.stride(0), x.shape[1], HAS_ROWS=has_rows,
                        BLOCK=block, num_warps=_SCALE_WARPS)
