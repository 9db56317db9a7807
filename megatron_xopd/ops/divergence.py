"""Per-token divergences between student and teacher logits sharded over the vocabulary (tensor parallelism).

Tokens are processed in chunks. The forward pass keeps only per-token scalars (and reduces only those across
ranks); the backward pass recomputes each chunk's probabilities from the saved inputs. See
``docs/vocab-parallel-math.md`` for the math.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup

from . import kernels
from .kernels import FORWARD_KL, JSD, KINDS, REVERSE_KL
from .sharding import VocabShard, global_max, vocab_shard

# Default chunk_size: these many elements of [chunk, V_local] over V_local. With the logits given, a CPU chunk is
# sized for its float32 temporaries to stay in cache, a GPU chunk to amortise kernel launches. The fused-linear
# form reads both weight shards once per chunk, so its chunks are large enough to amortise that read.
LOGITS_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}
LINEAR_CHUNK_ELEMENTS = 1 << 25

# A chunk loader maps rows (a slice or an index tensor) to (student, teacher, rows): logits [c, V_valid], or, with
# ``rows`` [c] not None, logits whose rows ``rows`` are the chunk (the kernels index them; no gathered copy).
Loader = Callable[[slice | torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
# Workspace slots beyond the kernels' own (0-4): the fused-linear form's logits chunks.
_STUDENT_SLOT, _TEACHER_SLOT = 5, 6
# The fused-linear ops write a chunk's logits gradient over its student logits, which kernels.divergence_grad
# reads before writing (the PyTorch path into log q first; the Triton kernel loads each block before storing it).
# With the kernels' statistics and gradient sharing two buffers, a float32 chunk at temperature 1 needs four
# [c, V/TP] buffers for reverse or forward KL (student and teacher logits and those two; eight before).


@dataclass(frozen=True)
class _Spec:
    kind: str  # after the beta endpoints are mapped to the KLs
    beta: float
    inv_temp: float
    chunk_size: int
    shard: VocabShard
    dtype: torch.dtype  # compute dtype: float64 for float64 inputs, else float32


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are computed in float32)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def check_common(temperature: float, chunk_size: int | None) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def effective_kind(kind: str, beta: float) -> str:
    """Validate ``kind``/``beta``; JSD at beta = 0 is forward KL and at beta = 1 reverse KL."""
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if kind == JSD and beta == 0.0:
        return FORWARD_KL
    if kind == JSD and beta == 1.0:
        return REVERSE_KL
    return kind


def selected_rows(mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
    """Indices of the tokens that count, or ``None`` for all of them."""
    if mask is None:
        return None
    if mask.shape != (n,) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape ({n},), got {mask.dtype} {tuple(mask.shape)}")
    return mask.to(device).nonzero().squeeze(1)


def default_chunk_size(chunk_size: int | None, local_cols: int, device: torch.device, linear: bool = False) -> int:
    """``chunk_size`` if given, else the default for this device and form."""
    if chunk_size:
        return chunk_size
    budget = LINEAR_CHUNK_ELEMENTS if linear else LOGITS_CHUNK_ELEMENTS.get(device.type, LOGITS_CHUNK_ELEMENTS["cuda"])
    return max(1, budget // max(local_cols, 1))


def row_chunks(n: int, rows: torch.Tensor | None, chunk_size: int) -> Iterator[tuple[slice, slice | torch.Tensor]]:
    """Per chunk: its positions among the selected tokens, and its rows of the inputs."""
    for start in range(0, n, chunk_size):
        pos = slice(start, min(start + chunk_size, n))
        yield pos, (pos if rows is None else rows[pos])


def _forward(
    load: Loader, n: int, rows: torch.Tensor | None, spec: _Spec, device: torch.device, work: kernels.Workspace
) -> tuple[torch.Tensor, torch.Tensor]:
    """Divergence [n] of the selected tokens and the backward state [n, 5] of :func:`kernels.divergence_grad`."""
    shard, kind = spec.shard, spec.kind
    stats = torch.zeros(n, 5, dtype=spec.dtype, device=device)
    stats[:, :2] = -math.inf
    if shard.valid:
        for pos, idx in row_chunks(n, rows, spec.chunk_size):
            s, t, chunk_rows = load(idx)
            stats[pos] = kernels.divergence_stats(s, t, spec.inv_temp, kind, spec.dtype, work, chunk_rows)
    m, shift = global_max(stats[:, :2], shard)
    scale = shift.exp()
    factors = torch.stack([scale[:, 0], scale[:, 1], scale[:, 0 if kind == REVERSE_KL else 1]], dim=1)
    z_s, z_t, expect = shard.all_reduce(stats[:, 2:] * factors).unbind(1)
    log_z_s, log_z_t = z_s.log(), z_t.log()
    # lse_s - lse_t from small pieces: the KLs below cancel only differences of s and t, not their magnitudes.
    lse_diff = (m[:, 0] - m[:, 1]) + (log_z_s - log_z_t)
    state = torch.stack([m[:, 0], log_z_s, m[:, 1], log_z_t, torch.zeros_like(z_s)], dim=1)
    if kind == REVERSE_KL:
        value = expect / z_s - lse_diff
        state[:, 4] = value  # the gradient's statistic is the KL itself
    elif kind == FORWARD_KL:
        value = expect / z_t + lse_diff
    else:
        terms = torch.zeros(n, 2, dtype=spec.dtype, device=device)
        if shard.valid:
            for pos, idx in row_chunks(n, rows, spec.chunk_size):
                s, t, chunk_rows = load(idx)
                terms[pos] = kernels.jsd_terms(s, t, spec.inv_temp, state[pos], spec.beta, work, chunk_rows)
        value, kl_student_mixture = shard.all_reduce(terms).unbind(1)
        state[:, 4] = kl_student_mixture
    return value, state


def _scatter_rows(value: torch.Tensor, rows: torch.Tensor | None, n_total: int) -> torch.Tensor:
    if rows is None:
        return value
    return value.new_zeros(n_total).index_copy_(0, rows, value)


def _upstream(grad_out: torch.Tensor, rows: torch.Tensor | None, spec: _Spec) -> torch.Tensor:
    """Upstream gradient of the selected tokens, times 1/temperature (the chain rule through s / T)."""
    g = grad_out if rows is None else grad_out[rows]
    return g.to(spec.dtype) * spec.inv_temp


def _logits_grad(
    student: torch.Tensor,
    teacher: torch.Tensor,
    rows: torch.Tensor | None,
    state: torch.Tensor,
    gscale: torch.Tensor | float,
    spec: _Spec,
) -> torch.Tensor:
    """The gradient w.r.t. the student logits, written once: the kernels write the selected rows (their padding
    columns as zeros), and only the unselected rows are zero-filled."""
    valid = spec.shard.valid
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    if not valid:
        return grad.zero_()
    if rows is not None:
        unselected = torch.ones(grad.shape[0], dtype=torch.bool, device=grad.device)
        unselected[rows] = False
        grad[unselected] = 0
    work = kernels.Workspace()
    load = _logits_loader(student, teacher, valid)
    for pos, idx in row_chunks(state.shape[0], rows, spec.chunk_size):
        s, t, chunk_rows = load(idx)
        out = grad if chunk_rows is not None else grad[idx]
        g = gscale[pos] if isinstance(gscale, torch.Tensor) else gscale
        kernels.divergence_grad(s, t, spec.inv_temp, state[pos], g, spec.kind, spec.beta, out, work, chunk_rows)
    return grad


class _LogitsDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, rows, spec: _Spec, grad_in_forward: bool):
        n = student.shape[0] if rows is None else rows.numel()
        load = _logits_loader(student, teacher, spec.shard.valid)
        value, state = _forward(load, n, rows, spec, student.device, kernels.Workspace())
        ctx.spec = spec
        ctx.grad_in_forward = grad_in_forward and ctx.needs_input_grad[0]
        if ctx.grad_in_forward:
            # The gradient for a unit upstream gradient: backward only scales it, and the logits are not kept.
            ctx.save_for_backward(_logits_grad(student, teacher, rows, state, spec.inv_temp, spec), rows)
        else:
            ctx.save_for_backward(student, teacher, rows, state)
        return _scatter_rows(value, rows, student.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        spec: _Spec = ctx.spec
        if ctx.grad_in_forward:
            # Scaled in place: a second backward through this graph fails autograd's saved-tensor version check.
            grad, rows = ctx.saved_tensors
            g = (grad_out if rows is None else grad_out[rows]).to(spec.dtype)
            kernels.scale_rows(grad, g, rows)
            return grad, None, None, None, None
        student, teacher, rows, state = ctx.saved_tensors
        grad = _logits_grad(student, teacher, rows, state, _upstream(grad_out, rows, spec), spec)
        return grad, None, None, None, None


def _logits_loader(student: torch.Tensor, teacher: torch.Tensor, valid: int) -> Loader:
    def load(idx):
        if isinstance(idx, slice):
            return student[idx, :valid], teacher[idx, :valid], None
        return student[:, :valid], teacher[:, :valid], idx

    return load


def _check_logits(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() != 2:
        raise ValueError(f"student_logits must be [N, V_local] (flatten batch dims first), got {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher_logits {tuple(teacher.shape)} and student_logits {tuple(student.shape)} must have the same "
            "shape (the same tokens and the same vocabulary shard)"
        )


def vocab_parallel_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    group: ProcessGroup | None = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    grad_in_forward: bool = False,
) -> torch.Tensor:
    """Per-token divergence [N] between vocab-sharded student and teacher logits [N, V_local].

    ``kind``: ``"reverse_kl"`` = KL(student || teacher), ``"forward_kl"`` = KL(teacher || student), or ``"jsd"``,
    the generalised JSD with M = beta p_teacher + (1 - beta) p_student (beta = 0 is forward KL, 1 reverse KL).
    Both logits are divided by ``temperature``. Tokens where ``mask`` [N] is False give 0 and no gradient.
    Columns with global id >= ``vocab_size`` are padding and are ignored. ``group=None`` is Megatron's TP group
    when initialised, else a single shard. Differentiable w.r.t. ``student_logits`` only; float32 output
    (float64 for float64 inputs).

    ``grad_in_forward``: when the student needs a gradient, write it in the forward pass (for a unit upstream
    gradient, as Liger-Kernel's fused losses do) and keep it instead of both logits; backward then scales its rows
    by the upstream gradient in place (rows whose upstream is exactly 1 are left alone on the Triton path). It
    costs one more read and write of the gradient when the upstream is not 1 (a weighted loss), so the default
    recomputes the gradient in backward from the saved logits instead (docs/gpu.md); backward can run only once.
    On the Triton path (CUDA, float32 compute) the default ``chunk_size`` is every token: its kernels need no
    temporaries.
    """
    _check_logits(student_logits, teacher_logits)
    check_common(temperature, chunk_size)
    kind = effective_kind(kind, beta)
    shard = vocab_shard(student_logits.shape[1], group, vocab_size)
    rows = selected_rows(mask, student_logits.shape[0], student_logits.device)
    dtype = compute_dtype(student_logits, teacher_logits)
    if chunk_size is None and kernels._use_triton(student_logits, dtype):
        chunk_size = max(student_logits.shape[0], 1)
    chunk_size = default_chunk_size(chunk_size, shard.valid, student_logits.device)
    spec = _Spec(kind, beta, 1.0 / temperature, chunk_size, shard, dtype)
    return _LogitsDivergence.apply(student_logits, teacher_logits, rows, spec, grad_in_forward)


class _FusedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, rows, spec: _Spec):
        n = student_hidden.shape[0] if rows is None else rows.numel()
        work = kernels.Workspace()
        load = _linear_loader(student_hidden, student_weight, teacher_hidden, teacher_weight, spec.shard.valid, work)
        value, state = _forward(load, n, rows, spec, student_hidden.device, work)
        ctx.save_for_backward(student_hidden, student_weight, teacher_hidden, teacher_weight, rows, state)
        ctx.spec = spec
        return _scatter_rows(value, rows, student_hidden.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h_s, w_s, h_t, w_t, rows, state = ctx.saved_tensors
        spec: _Spec = ctx.spec
        valid = spec.shard.valid
        work = kernels.Workspace()
        load = _linear_loader(h_s, w_s, h_t, w_t, valid, work)
        gscale = _upstream(grad_out, rows, spec)
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.zeros_like(h_s) if need_h else None
        # Low-precision weights accumulate their gradient over chunks in float32.
        grad_w = torch.zeros_like(w_s, dtype=torch.promote_types(w_s.dtype, torch.float32)) if need_w else None
        if valid:
            for pos, idx in row_chunks(state.shape[0], rows, spec.chunk_size):
                s, t, _ = load(idx)
                # The gradient overwrites the student logits chunk (see the note on the slots at the top).
                kernels.divergence_grad(s, t, spec.inv_temp, state[pos], gscale[pos], spec.kind, spec.beta, s, work)
                _add_head_grads(s, idx, h_s, w_s, valid, grad_h, grad_w)
        if need_h:
            # The hidden state is replicated over the TP group: its gradient sums every shard's part.
            spec.shard.all_reduce(grad_h)
        return grad_h, None if grad_w is None else grad_w.to(w_s.dtype), None, None, None, None


def _add_head_grads(
    out: torch.Tensor, idx, h_s: torch.Tensor, w_s: torch.Tensor, valid: int,
    grad_h: torch.Tensor | None, grad_w: torch.Tensor | None,
) -> None:
    """One chunk's gradient of the logits ``out`` [c, valid] taken back through the head: into the hidden states'
    rows ``idx`` and, accumulated, into the head shard's valid rows."""
    if grad_h is not None:
        grad_h[idx] = out @ w_s[:valid]
    if grad_w is not None and grad_w.dtype == out.dtype:
        grad_w[:valid].addmm_(out.t(), h_s[idx])
    elif grad_w is not None:
        grad_w[:valid] += out.t() @ h_s[idx]


class _FusedLinearDivergenceLoss(torch.autograd.Function):
    """``sum_i c_i D_i`` with the gradients computed inside the forward, chunk by chunk (Liger-Kernel's
    fused-linear scheme): each chunk's logits are built once, and its divergence and its gradient with respect to
    the hidden states and the head shard are taken from them before the next chunk. The backward only scales
    the saved gradients by the upstream scalar. Two matmuls fewer than :class:`_FusedLinearDivergence`, whose
    backward rebuilds every chunk's logits."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, coefficients, rows, spec: _Spec, need_h: bool, need_w: bool):
        n = h_s.shape[0] if rows is None else rows.numel()
        valid = spec.shard.valid
        work = kernels.Workspace()
        load = _linear_loader(h_s, w_s, h_t, w_t, valid, work)
        values = torch.zeros(n, dtype=spec.dtype, device=h_s.device)
        grad_h = torch.zeros_like(h_s) if need_h else None
        # Low-precision weights accumulate their gradient over chunks in float32.
        grad_w = torch.zeros_like(w_s, dtype=torch.promote_types(w_s.dtype, torch.float32)) if need_w else None
        gscale = _upstream(coefficients, rows, spec)
        for pos, idx in row_chunks(n, rows, spec.chunk_size):
            chunk = load(idx) if valid else None  # read twice by the JSD's forward: built once
            value, state = _forward(lambda _: chunk, pos.stop - pos.start, None, spec, h_s.device, work)
            values[pos] = value
            if (need_h or need_w) and valid:
                s, t, _ = chunk  # the linear loader builds the chunk's own rows (no row index)
                # The gradient overwrites the student logits chunk (see the note on the slots at the top).
                kernels.divergence_grad(s, t, spec.inv_temp, state, gscale[pos], spec.kind, spec.beta, s, work)
                _add_head_grads(s, idx, h_s, w_s, valid, grad_h, grad_w)
        if need_h:
            spec.shard.all_reduce(grad_h)  # the hidden state is replicated over the TP group
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(w_s.dtype))
        values = _scatter_rows(values, rows, h_s.shape[0])
        ctx.mark_non_differentiable(values)
        return (values * coefficients.to(values.dtype)).sum(), values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_values):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        scale = lambda g: None if g is None else g.mul_(grad_loss.to(g.dtype))  # noqa: E731 - ours to overwrite
        return scale(grad_h), scale(grad_w), None, None, None, None, None, None, None


def _linear_loader(h_s, w_s, h_t, w_t, valid: int, work: kernels.Workspace) -> Loader:
    def load(idx):
        h_s_c, h_t_c = h_s[idx], h_t[idx]
        s = work.get(_STUDENT_SLOT, (h_s_c.shape[0], valid), h_s.dtype, h_s.device)
        t = work.get(_TEACHER_SLOT, (h_t_c.shape[0], valid), h_t.dtype, h_t.device)
        return torch.mm(h_s_c, w_s[:valid].t(), out=s), torch.mm(h_t_c, w_t[:valid].t(), out=t), None

    return load


def _check_linear(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor) -> None:
    for name, h, w in (("student", h_s, w_s), ("teacher", h_t, w_t)):
        if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1] or h.dtype != w.dtype:
            raise ValueError(
                f"{name}_hidden [N, H] and {name}_weight [V_local, H] must match in H and dtype, got "
                f"{tuple(h.shape)} {h.dtype} and {tuple(w.shape)} {w.dtype}"
            )
    if h_t.shape[0] != h_s.shape[0] or w_t.shape[0] != w_s.shape[0]:
        raise ValueError(
            f"student and teacher must have the same tokens and vocabulary shard: hidden {tuple(h_s.shape)} vs "
            f"{tuple(h_t.shape)}, weight {tuple(w_s.shape)} vs {tuple(w_t.shape)}"
        )


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    group: ProcessGroup | None = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """:func:`vocab_parallel_divergence` of the logits ``student_hidden @ student_weight.T`` and
    ``teacher_hidden @ teacher_weight.T``, built chunk by chunk so no [N, V_local] logits outlive a chunk.

    Hidden states are [N, H] (the teacher's width may differ) and weights are this rank's output-layer shards
    [V_local, H]. Differentiable w.r.t. ``student_hidden`` (its gradient is summed over the TP group, the
    hidden state being replicated there) and ``student_weight``.
    """
    _check_linear(student_hidden, student_weight, teacher_hidden, teacher_weight)
    n = student_hidden.shape[0]
    check_common(temperature, chunk_size)
    kind = effective_kind(kind, beta)
    shard = vocab_shard(student_weight.shape[0], group, vocab_size)
    rows = selected_rows(mask, n, student_hidden.device)
    chunk_size = default_chunk_size(chunk_size, shard.valid, student_hidden.device, linear=True)
    dtype = compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
    spec = _Spec(kind, beta, 1.0 / temperature, chunk_size, shard, dtype)
    return _FusedLinearDivergence.apply(student_hidden, student_weight, teacher_hidden, teacher_weight, rows, spec)


def fused_linear_divergence_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    kind: str,
    coefficients: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    group: ProcessGroup | None = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss ``sum_i coefficients[i] * D_i`` and the per-token divergences ``D`` [N] (no gradient) of
    :func:`fused_linear_divergence`, for a loss whose per-token coefficients are known before the backward.

    The gradients with respect to ``student_hidden`` and ``student_weight`` are computed during the forward, one
    token chunk at a time, and held until the backward: the logits are built once instead of twice, at the price
    of holding a gradient-sized buffer of the head shard from the forward on (it is the one the backward
    returns). ``coefficients`` [N] take no gradient.
    """
    _check_linear(student_hidden, student_weight, teacher_hidden, teacher_weight)
    n = student_hidden.shape[0]
    if coefficients.shape != (n,):
        raise ValueError(f"coefficients must be [N] = [{n}], got {tuple(coefficients.shape)}")
    check_common(temperature, chunk_size)
    kind = effective_kind(kind, beta)
    shard = vocab_shard(student_weight.shape[0], group, vocab_size)
    rows = selected_rows(mask, n, student_hidden.device)
    # Collectives run per chunk: the chunk count must not depend on the rank's share of real columns.
    chunk_size = default_chunk_size(chunk_size, student_weight.shape[0], student_hidden.device, linear=True)
    dtype = compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
    spec = _Spec(kind, beta, 1.0 / temperature, chunk_size, shard, dtype)
    grad = torch.is_grad_enabled()
    return _FusedLinearDivergenceLoss.apply(
        student_hidden, student_weight, teacher_hidden, teacher_weight, coefficients.detach(), rows, spec,
        grad and student_hidden.requires_grad, grad and student_weight.requires_grad,
    )
