"""Where a vocabulary shard sits in the tensor-parallel group, and the all-reduces the vocab-parallel ops use."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, ReduceOp


def resolve_group(group: ProcessGroup | None) -> ProcessGroup | None:
    """The group to reduce over, or ``None`` when there is nothing to communicate.

    ``None`` means Megatron's tensor-parallel group when Megatron's model parallel state is initialised; a group
    of one rank needs no communication either.
    """
    if group is None:
        # Megatron cannot be initialised if it was never imported, and importing it costs seconds.
        parallel_state = sys.modules.get("megatron.core.parallel_state")
        if parallel_state is None or not parallel_state.model_parallel_is_initialized():
            return None
        group = parallel_state.get_tensor_model_parallel_group()
    return group if dist.get_world_size(group) > 1 else None


@dataclass(frozen=True)
class VocabShard:
    """This rank's columns of a vocabulary split evenly over ``group`` (``None``: one shard, no communication).

    Local column ``j`` is global id ``offset + j``. Only the first ``valid`` local columns are real tokens;
    the rest are padding (global id >= the true vocabulary size) and are left out of every computation.
    """

    group: ProcessGroup | None
    offset: int
    local_size: int
    valid: int
    vocab_size: int

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp.RedOpType = ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce over the group (no-op for a single shard). Not differentiable, on purpose."""
        if self.group is not None:
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor


def vocab_shard(local_size: int, group: ProcessGroup | None, vocab_size: int | None) -> VocabShard:
    """Shard geometry for ``local_size`` local columns; ``vocab_size`` is the true (unpadded) vocabulary size."""
    group = resolve_group(group)
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    total = local_size * world
    if vocab_size is None:
        vocab_size = total
    elif not 0 < vocab_size <= total:
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, {total}] ({local_size} local columns x {world} ranks)"
        )
    offset = rank * local_size
    return VocabShard(group, offset, local_size, min(max(vocab_size - offset, 0), local_size), vocab_size)


def global_max(local_max: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """MAX all-reduce of per-row local maxima (``-inf`` for an empty shard), in one collective for all columns.

    Returns the global maxima ``m`` and the log-factor ``d = m_local - m`` (<= 0) that moves a local sum of
    ``exp(x - m_local)`` to one of ``exp(x - m)``: multiply it by ``exp(d)``. An empty shard gets ``d = 0``,
    its sums being zero.
    """
    m = shard.all_reduce(local_max.clone(), ReduceOp.MAX)
    return m, torch.where(torch.isfinite(local_max), local_max - m, torch.zeros_like(m))


def local_columns(ids: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Local column of each global id (clamped into the shard, so always a valid index) and whether it is ours."""
    local = ids - shard.offset
    owned = (local >= 0) & (local < shard.valid)
    return local.clamp(0, max(shard.valid - 1, 0)), owned


def check_token_ids(ids: torch.Tensor, shape: tuple[int, ...], name: str, vocab_size: int) -> None:
    """Raise ``ValueError`` unless ``ids`` is an integer tensor of ``shape`` with values in [0, vocab_size)."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool or tuple(ids.shape) != shape:
        raise ValueError(f"{name} must be an integer tensor of shape {shape}, got {ids.dtype} {tuple(ids.shape)}")
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{name} must be global token ids in [0, {vocab_size})")
