"""Reductions of per-rank sums over the ranks that report them (one rank per data-parallel replica)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from .device import current_device


def is_reporting_rank() -> bool:
    """One rank per DP replica contributes each sum: the last pipeline stage, TP rank 0 (where the losses are)."""
    return parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0


def reduce_over_replicas(values: dict[str, float], op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> dict[str, float]:
    """``op`` of each value over the reporting ranks (other ranks contribute 0); every rank gets the result."""
    keys = sorted(values)
    own = is_reporting_rank()
    tensor = torch.tensor([values[k] if own else 0.0 for k in keys], dtype=torch.float64, device=current_device())
    dist.all_reduce(tensor, op=op)
    return dict(zip(keys, tensor.tolist()))


def agree_on_step(has_input: bool, has_work: bool) -> tuple[bool, bool]:
    """(does any rank have input, does every rank have work): one all-reduce over the world.

    Every rank must take the same branch: a rank that skipped a step alone would leave the others waiting in
    the step's collectives until they time out.
    """
    flags = torch.tensor([-float(has_input), float(has_work)], device=current_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return bool(flags[0] < 0), bool(flags[1] > 0)


def all_ranks_agree(ok: bool) -> bool:
    """True only if ``ok`` holds on every rank (one all-reduce over the world)."""
    flag = torch.tensor([1.0 if ok else 0.0], device=current_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def max_over_group(values: list[int], group: dist.ProcessGroup, device: torch.device) -> list[int]:
    """Element-wise maximum of ``values`` over ``group`` (one all-reduce)."""
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in t.tolist()]
