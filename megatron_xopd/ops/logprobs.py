"""Log-probabilities of target tokens (and the entropy) from logits sharded over the vocabulary."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup

from .divergence import check_common, compute_dtype, default_chunk_size, row_chunks
from .kernels import scaled
from .sharding import VocabShard, check_token_ids, global_max, local_columns, vocab_shard


@dataclass(frozen=True)
class _Spec:
    inv_temp: float
    chunk_size: int
    shard: VocabShard
    dtype: torch.dtype
    entropy: bool


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, spec: _Spec):
        shard, n = spec.shard, logits.shape[0]
        maxes = torch.full((n, 1), -math.inf, dtype=spec.dtype, device=logits.device)
        # Per token: sum exp(s - m), sum exp(s - m) (s - m) (for the entropy), and the target's logit.
        sums = torch.zeros(n, 3, dtype=spec.dtype, device=logits.device)
        if shard.valid:
            for pos, _ in row_chunks(n, None, spec.chunk_size):
                s = scaled(logits[pos, : shard.valid], spec.inv_temp, spec.dtype)
                maxes[pos, 0] = m = s.amax(dim=1)
                e = s - m[:, None]
                if spec.entropy:
                    sums[pos, 1] = torch.linalg.vecdot(e.exp(), e)
                sums[pos, 0] = e.exp_().sum(dim=1)
                local, owned = local_columns(targets[pos, None], shard)
                sums[pos, 2] = s.gather(1, local).squeeze(1).masked_fill_(~owned.squeeze(1), 0.0)
        m, shift = global_max(maxes, shard)
        scale = shift.exp()
        sums[:, 1:2] = scale * (sums[:, 1:2] + shift * sums[:, 0:1])
        sums[:, 0:1] *= scale
        z, expect, target_logit = shard.all_reduce(sums).unbind(1)
        m, log_z = m[:, 0], z.log()
        entropy = log_z - expect / z
        ctx.save_for_backward(logits, targets, m, log_z, entropy)
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        # (x - max) - log Z rather than x - lse: exact for the argmax, whatever the logits' magnitude.
        return (target_logit - m) - log_z, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprob, grad_entropy):
        logits, targets, m, log_z, entropy = ctx.saved_tensors
        spec: _Spec = ctx.spec
        shard = spec.shard
        grad = torch.zeros_like(logits)
        if not shard.valid or (grad_logprob is None and grad_entropy is None):
            return grad, None, None
        zeros = torch.zeros_like(m)
        g_lp = zeros if grad_logprob is None else grad_logprob.to(spec.dtype)
        g_h = zeros if grad_entropy is None else grad_entropy.to(spec.dtype)
        for pos, _ in row_chunks(logits.shape[0], None, spec.chunk_size):
            s = scaled(logits[pos, : shard.valid], spec.inv_temp, spec.dtype)
            log_q = (s - m[pos, None]).sub_(log_z[pos, None])
            # d logprob / ds = onehot - q;  d entropy / ds = -q (log q + H)
            coef = g_lp[pos, None] + g_h[pos, None] * (log_q + entropy[pos, None])
            w = log_q.exp_().mul_(coef).neg_()
            local, owned = local_columns(targets[pos, None], shard)
            w.scatter_add_(1, local, g_lp[pos, None].masked_fill(~owned, 0.0))
            grad[pos, : shard.valid] = w.mul_(spec.inv_temp)
        return grad, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    group: ProcessGroup | None = None,
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability [N] of each target (global token id) under softmax(logits / temperature), from this rank's
    vocabulary shard ``logits`` [N, V_local]; with ``return_entropy``, also the entropy [N] of that distribution.

    Columns with global id >= ``vocab_size`` are padding and are ignored. ``group=None`` is Megatron's TP group
    when initialised, else a single shard. Differentiable w.r.t. ``logits``; float32 output (float64 for
    float64 logits).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V_local] (flatten batch dims first), got {tuple(logits.shape)}")
    check_common(temperature, chunk_size)
    shard = vocab_shard(logits.shape[1], group, vocab_size)
    check_token_ids(targets, (logits.shape[0],), "targets", shard.vocab_size)
    chunk_size = default_chunk_size(chunk_size, shard.valid, logits.device)
    spec = _Spec(1.0 / temperature, chunk_size, shard, compute_dtype(logits), return_entropy)
    logprobs, entropy = _VocabParallelLogprobs.apply(logits, targets.to(torch.int64), spec)
    return (logprobs, entropy) if return_entropy else logprobs


class _FusedLinearLogprobs(torch.autograd.Function):
    """Log-probs of the targets under ``softmax(hidden @ weight.T / T)``, the logits built one token chunk at a
    time in the forward (statistics) and again in the backward (gradient), so no [N, V_local] tensor outlives a
    chunk. The statistics of all chunks are combined over the TP group in one collective."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, spec: _Spec):
        shard, n = spec.shard, hidden.shape[0]
        maxes = torch.full((n, 1), -math.inf, dtype=spec.dtype, device=hidden.device)
        sums = torch.zeros(n, 2, dtype=spec.dtype, device=hidden.device)  # sum exp(s - m_local), target logit
        if shard.valid:
            w = weight[: shard.valid]
            for pos, _ in row_chunks(n, None, spec.chunk_size):
                s = scaled(hidden[pos] @ w.t(), spec.inv_temp, spec.dtype)
                maxes[pos, 0] = m = s.amax(dim=1)
                local, owned = local_columns(targets[pos, None], shard)
                sums[pos, 1] = s.gather(1, local).squeeze(1).masked_fill_(~owned.squeeze(1), 0.0)
                sums[pos, 0] = s.sub_(m[:, None]).exp_().sum(dim=1)
        m, shift = global_max(maxes, shard)
        sums[:, 0:1] *= shift.exp()
        z, target_logit = shard.all_reduce(sums).unbind(1)
        m, log_z = m[:, 0], z.log()
        ctx.save_for_backward(hidden, weight, targets, m, log_z)
        ctx.spec = spec
        return (target_logit - m) - log_z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprob):
        hidden, weight, targets, m, log_z = ctx.saved_tensors
        spec: _Spec = ctx.spec
        shard = spec.shard
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if need_w else None
        if shard.valid:
            w = weight[: shard.valid]
            g = grad_logprob.to(spec.dtype)
            for pos, _ in row_chunks(hidden.shape[0], None, spec.chunk_size):
                s = scaled(hidden[pos] @ w.t(), spec.inv_temp, spec.dtype)
                # d logprob / ds = onehot - q, times the upstream gradient and the chain rule through s / T
                q = s.sub_(m[pos, None]).sub_(log_z[pos, None]).exp_()
                grad_s = q.mul_(g[pos, None]).neg_()
                local, owned = local_columns(targets[pos, None], shard)
                grad_s.scatter_add_(1, local, g[pos, None].masked_fill(~owned, 0.0))
                grad_s = grad_s.mul_(spec.inv_temp).to(hidden.dtype)
                if need_h:
                    grad_h[pos] = grad_s @ w
                if need_w:
                    grad_w[: shard.valid].addmm_(grad_s.t().to(grad_w.dtype), hidden[pos].to(grad_w.dtype))
        if need_h:
            shard.all_reduce(grad_h)  # the hidden state is replicated over the TP group: its gradient sums the shards'
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    group: ProcessGroup | None = None,
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`vocab_parallel_logprobs` of the logits ``hidden @ weight.T`` (hidden [N, H], this rank's head shard
    [V_local, H]), built chunk by chunk so no [N, V_local] logits outlive a chunk. Differentiable w.r.t. ``hidden``
    (summed over the TP group, where it is replicated) and ``weight``; the backward rebuilds each chunk's logits."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V_local, H] must match in H, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    check_common(temperature, chunk_size)
    shard = vocab_shard(weight.shape[0], group, vocab_size)
    check_token_ids(targets, (hidden.shape[0],), "targets", shard.vocab_size)
    chunk_size = default_chunk_size(chunk_size, weight.shape[0], hidden.device, linear=True)
    spec = _Spec(1.0 / temperature, chunk_size, shard, compute_dtype(hidden, weight), False)
    return _FusedLinearLogprobs.apply(hidden, weight, targets.to(torch.int64), spec)
