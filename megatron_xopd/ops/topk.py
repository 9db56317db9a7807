"""Divergence against a sparse teacher: its top-k token ids and log-probs, plus a tail bucket for the rest.

Both distributions become k + 1 buckets per token: the teacher's ids I and the tail (every other token). The
student's bucket log-probs come from its vocab-sharded logits; its tail is a log-sum-exp over the tokens not in
I (never 1 - sum q_I, which cancels), with its own row max so a tiny tail stays exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup

from .divergence import (
    check_common,
    compute_dtype,
    default_chunk_size,
    effective_kind,
    row_chunks,
    selected_rows,
)
from .kernels import FORWARD_KL, REVERSE_KL, log_mixture, scaled
from .sharding import VocabShard, check_token_ids, global_max, local_columns, vocab_shard


@dataclass(frozen=True)
class _Spec:
    inv_temp: float
    chunk_size: int
    shard: VocabShard
    dtype: torch.dtype


def _without_ids(s: torch.Tensor, local: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """``s`` with this shard's columns of the ids set to -inf (the others, clamped indices, left alone)."""
    fill = torch.full_like(local, math.inf, dtype=s.dtype).masked_fill_(owned, -math.inf)
    return s.scatter_reduce(1, local, fill, "amin")


class _TopkStudentLogprobs(torch.autograd.Function):
    """Student log-probs [n, k + 1] of the teacher's ids and of the tail bucket, for the selected rows."""

    @staticmethod
    def forward(ctx, student, ids, rows, spec: _Spec):
        shard = spec.shard
        n, k = ids.shape
        maxes = torch.full((n, 2), -math.inf, dtype=spec.dtype, device=student.device)
        sums = torch.zeros(n, 2 + k, dtype=spec.dtype, device=student.device)  # Z, Z_tail, gathered logits
        if shard.valid:
            for pos, idx in row_chunks(n, rows, spec.chunk_size):
                s = scaled(student[idx, : shard.valid], spec.inv_temp, spec.dtype)
                local, owned = local_columns(ids[pos], shard)
                tail = _without_ids(s, local, owned)
                m, m_tail = s.amax(dim=1), tail.amax(dim=1)
                maxes[pos] = torch.stack([m, m_tail], dim=1)
                m_tail = torch.where(torch.isfinite(m_tail), m_tail, 0.0)  # every column here is one of the ids
                sums[pos, 0] = (s - m[:, None]).exp_().sum(dim=1)
                sums[pos, 1] = (tail - m_tail[:, None]).exp_().sum(dim=1)
                sums[pos, 2:] = s.gather(1, local).masked_fill_(~owned, 0.0)
        m, shift = global_max(maxes, shard)
        sums[:, :2] *= shift.exp()
        shard.all_reduce(sums)
        norm = torch.stack([m[:, 0], sums[:, 0].log(), m[:, 1], sums[:, 1].log()], dim=1)  # max, log Z; tail's
        ctx.save_for_backward(student, ids, rows, norm)
        ctx.spec = spec
        # (x - max) - log Z rather than x - lse: exact for the argmax, whatever the logits' magnitude.
        log_q_ids = (sums[:, 2:] - norm[:, 0:1]) - norm[:, 1:2]
        log_q_tail = (norm[:, 2:3] - norm[:, 0:1]) + (norm[:, 3:4] - norm[:, 1:2])
        return torch.cat([log_q_ids, log_q_tail], dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        student, ids, rows, norm = ctx.saved_tensors
        spec: _Spec = ctx.spec
        shard = spec.shard
        grad = torch.zeros_like(student)
        if not shard.valid:
            return grad, None, None, None
        g = grad_out.to(spec.dtype)
        g_ids, g_tail, g_sum = g[:, :-1], g[:, -1], g.sum(dim=1)
        for pos, idx in row_chunks(ids.shape[0], rows, spec.chunk_size):
            s = scaled(student[idx, : shard.valid], spec.inv_temp, spec.dtype)
            local, owned = local_columns(ids[pos], shard)
            # d log q_i / ds_j = [j = i] - q_j;  d log q_tail / ds_j = [j not in I] q_j / q_tail - q_j
            m, log_z, m_tail, log_z_tail = (norm[pos, i, None] for i in range(4))
            w = (_without_ids(s, local, owned) - m_tail).sub_(log_z_tail).exp_().mul_(g_tail[pos, None])
            w -= (s - m).sub_(log_z).exp_().mul_(g_sum[pos, None])
            w.scatter_add_(1, local, g_ids[pos].masked_fill(~owned, 0.0))
            grad[idx, : shard.valid] = w.mul_(spec.inv_temp)
        return grad, None, None, None


def bucket_divergence(log_q: torch.Tensor, log_p: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Divergence over the last dim between two (small) distributions given as log-probs; differentiable."""
    if kind == REVERSE_KL:
        return (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    if kind == FORWARD_KL:
        return (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    log_m = log_mixture(log_q, log_p, beta)
    return (beta * log_p.exp() * (log_p - log_m) + (1.0 - beta) * log_q.exp() * (log_q - log_m)).sum(dim=-1)


def teacher_buckets(teacher_topk_logprobs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Teacher log-probs [n, k + 1]: the top-k and log(1 - sum p_I), the tail floored at float32's smallest
    normal number so that rounding (top-k mass >= 1) cannot make a reverse KL or JSD infinite."""
    log_p = teacher_topk_logprobs.to(dtype)
    tail = (-torch.expm1(torch.logsumexp(log_p, dim=1))).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.cat([log_p, tail.log()[:, None]], dim=1)


def vocab_parallel_topk_divergence(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    group: ProcessGroup | None = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Per-token divergence [N] between the student (vocab-sharded logits [N, V_local]) and a sparse teacher.

    The teacher gives, per token, ``k`` distinct global ids [N, k] and their log-probs [N, k] (already at the
    teacher's temperature; ``temperature`` divides the student's logits only). Both sides are compared as
    k + 1 buckets: the ids and the tail of all other tokens. ``kind``/``beta`` are as in
    :func:`~megatron_xopd.ops.vocab_parallel_divergence` (``"forward_kl"``, the usual choice, is
    sum_I p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)). ``mask``, ``group``, ``chunk_size`` and
    ``vocab_size`` are as there too. Differentiable w.r.t. ``student_logits``.
    """
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V_local], got {tuple(student_logits.shape)}")
    n = student_logits.shape[0]
    if teacher_topk_ids.dim() != 2 or teacher_topk_ids.shape[0] != n or teacher_topk_ids.shape[1] < 1:
        raise ValueError(f"teacher_topk_ids must be [{n}, k] with k >= 1, got {tuple(teacher_topk_ids.shape)}")
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape or not teacher_topk_logprobs.is_floating_point():
        raise ValueError(
            f"teacher_topk_logprobs must be a float tensor shaped like teacher_topk_ids "
            f"{tuple(teacher_topk_ids.shape)}, got {teacher_topk_logprobs.dtype} {tuple(teacher_topk_logprobs.shape)}"
        )
    check_common(temperature, chunk_size)
    kind = effective_kind(kind, beta)
    shard = vocab_shard(student_logits.shape[1], group, vocab_size)
    k = teacher_topk_ids.shape[1]
    if k >= shard.vocab_size:
        raise ValueError(f"top-k must leave a tail: k={k} >= vocab_size={shard.vocab_size}")
    rows = selected_rows(mask, n, student_logits.device)
    ids = teacher_topk_ids if rows is None else teacher_topk_ids[rows]
    log_p = teacher_topk_logprobs if rows is None else teacher_topk_logprobs[rows]
    check_token_ids(ids, tuple(ids.shape), "teacher_topk_ids", shard.vocab_size)
    ids = ids.to(torch.int64)
    ordered = ids.sort(dim=1).values
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ValueError("teacher_topk_ids must be distinct within each token")
    dtype = compute_dtype(student_logits, teacher_topk_logprobs)
    spec = _Spec(1.0 / temperature, default_chunk_size(chunk_size, shard.valid, student_logits.device), shard, dtype)
    log_q = _TopkStudentLogprobs.apply(student_logits, ids, rows, spec)
    value = bucket_divergence(log_q, teacher_buckets(log_p, dtype), kind, beta)
    return value if rows is None else value.new_zeros(n).index_put((rows,), value)


@torch.no_grad()
def vocab_parallel_topk(
    logits: torch.Tensor,
    k: int,
    group: ProcessGroup | None = None,
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely global token ids [N, k] and their log-probs [N, k] under softmax(logits / temperature),
    from this rank's vocabulary shard ``logits`` [N, V_local]: the sparse teacher of
    :func:`vocab_parallel_topk_divergence`. Each rank proposes its local top-k (one all-gather of [N, 2k + 2]);
    ids are ordered by decreasing probability. No gradient (the teacher is frozen)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V_local], got {tuple(logits.shape)}")
    check_common(temperature, None)
    shard = vocab_shard(logits.shape[1], group, vocab_size)
    if not 1 <= k < shard.vocab_size:
        raise ValueError(f"top-k needs 1 <= k < vocab_size={shard.vocab_size} (a tail must remain), got k={k}")
    n, dtype = logits.shape[0], compute_dtype(logits)
    s = scaled(logits[:, : shard.valid], 1.0 / temperature, dtype)
    values = torch.full((n, k), -math.inf, dtype=dtype, device=logits.device)
    ids = torch.zeros(n, k, dtype=dtype, device=logits.device)
    maxes = torch.full((n, 1), -math.inf, dtype=dtype, device=logits.device)
    z = torch.zeros(n, 1, dtype=dtype, device=logits.device)
    kv = min(k, shard.valid)
    if kv:
        top = s.topk(kv, dim=1)
        values[:, :kv], ids[:, :kv] = top.values, (top.indices + shard.offset).to(dtype)
        maxes[:, 0] = top.values[:, 0]
        z[:, 0] = (s - maxes).exp_().sum(dim=1)
    m, shift = global_max(maxes, shard)
    z = shard.all_reduce(z * shift.exp())
    pack = torch.cat([values, ids], dim=1)
    if shard.group is not None:
        parts = [torch.empty_like(pack) for _ in range(torch.distributed.get_world_size(shard.group))]
        torch.distributed.all_gather(parts, pack.contiguous(), group=shard.group)
        pack = torch.cat([p.view(n, 2, k) for p in parts], dim=2).view(n, -1)
    cand_values, cand_ids = pack.view(n, 2, -1).unbind(1)
    best = cand_values.topk(k, dim=1)
    log_p = (best.values - m) - z.log()
    return cand_ids.gather(1, best.indices).to(torch.int64), log_p
