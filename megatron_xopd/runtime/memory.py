"""Peak memory of a training step, as logged in ``metrics.jsonl`` (``peak_mem_mb``, on CUDA also
``peak_mem_allocated_mb``).

What is measured depends on the device, and the two are not comparable:
- CUDA: ``peak_mem_mb`` is ``torch.cuda.max_memory_reserved`` since :func:`reset_peak_memory` (called at the start
  of each step): what the caching allocator held on this rank's GPU at its peak, tensors plus its reserve and
  fragmentation, i.e. what the GPU really had to hold; ``peak_mem_allocated_mb`` is ``max_memory_allocated``, the
  peak of live tensors alone (the gap between the two is the allocator's overhead).
- CPU: ``peak_mem_mb`` is ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the process's peak resident set size since
  it started (interpreter, libraries and all tensors), which never goes down, so it is the peak up to this step.
  There is no allocated/reserved split on CPU: ``peak_mem_allocated_mb`` is not logged.
The logged values are the maxima over all ranks.
"""

from __future__ import annotations

import resource
import sys

import torch
import torch.distributed as dist

from .device import current_device


def reset_peak_memory() -> None:
    """Start a new peak (CUDA only; the CPU's ru_maxrss cannot be reset)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def local_peak_memory_mb() -> float:
    """This process's peak memory in MiB (see the module docstring for what it is on each device)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_reserved() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def local_peak_memory() -> dict[str, float]:
    """``peak_mem_mb`` and, on CUDA, ``peak_mem_allocated_mb`` of this process (MiB)."""
    out = {"peak_mem_mb": local_peak_memory_mb()}
    if torch.cuda.is_available():
        out["peak_mem_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def peak_memory() -> dict[str, float]:
    """:func:`local_peak_memory`, each value the maximum over all ranks (one collective when distributed)."""
    peak = local_peak_memory()
    if not (dist.is_available() and dist.is_initialized()):
        return peak
    tensor = torch.tensor(list(peak.values()), dtype=torch.float64, device=current_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return dict(zip(peak, tensor.tolist()))


def peak_memory_mb() -> float:
    """The maximum of :func:`local_peak_memory_mb` over all ranks (collective when distributed is initialised)."""
    return peak_memory()["peak_mem_mb"]
