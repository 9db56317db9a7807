"""The one place that decides where this rank's tensors live.

Every tensor the trainer, rollouts, teacher, perception and collectives create goes to :func:`current_device`:
``cuda:<local rank>`` (set by :func:`~megatron_xopd.runtime.init_distributed` under NCCL) when CUDA is present,
else the CPU. NCCL reduces only CUDA tensors, so counters that are all-reduced must be made here too. On CPU the
compatibility layer maps every CUDA device to the CPU, so no CPU test can catch a tensor left on the wrong
device: ``benchmarks/gpu_check.py`` runs the trainer on a GPU for that.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def current_device() -> torch.device:
    """This rank's device: its CUDA device when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def resident(module: torch.nn.Module, *, offload: bool) -> Iterator[None]:
    """With ``offload``, ``module`` lives in host memory and is on this rank's device only inside the block
    (the teacher outside its scoring phase, ``trainer.offload_teacher``)."""
    if not offload:
        yield
        return
    module.to(current_device())
    try:
        yield
    finally:
        module.cpu()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
