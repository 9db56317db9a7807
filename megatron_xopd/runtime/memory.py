"""Peak memory of a training step, as logged in ``metrics.jsonl`` (``peak_mem_mb``).

What is measured depends on the device, and the two are not comparable:
- CUDA: ``torch.cuda.max_memory_allocated`` since :func:`reset_peak_memory` (called at the start of each step):
  the step's peak of tensors allocated by PyTorch on this rank's GPU (not the caching allocator's reserve).
- CPU: ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the process's peak resident set size since it started
  (interpreter, libraries and all tensors), which never goes down, so it is the peak up to this step.
The logged value is the maximum over all ranks.
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
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def peak_memory_mb() -> float:
    """The maximum of :func:`local_peak_memory_mb` over all ranks (collective when distributed is initialised)."""
    peak = local_peak_memory_mb()
    if not (dist.is_available() and dist.is_initialized()):
        return peak
    tensor = torch.tensor([peak], dtype=torch.float64, device=current_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())
