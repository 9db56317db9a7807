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


class HostCopy:
    """A frozen module's weights kept once in host memory (pinned where CUDA is present), moved in by one copy.

    The first :meth:`to_device` copies every parameter and buffer into host buffers allocated once; each later
    one copies host -> device (asynchronous from pinned memory), and :meth:`to_host` only points the module back
    at the host buffers: the weights never change (the teacher is frozen), so nothing is copied back. A tensor
    taken from the module while it was on the device (the teacher's head shard kept for the loss) stays there.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.host: dict[str, torch.Tensor] = {}

    def _tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.module.named_parameters(remove_duplicate=True)
        yield from self.module.named_buffers(remove_duplicate=True)

    def to_device(self, device: torch.device) -> None:
        pin = torch.cuda.is_available()
        for name, tensor in self._tensors():
            if name not in self.host:
                self.host[name] = torch.empty_like(tensor, device="cpu", pin_memory=pin).copy_(tensor)
            tensor.data = self.host[name].to(device, non_blocking=pin)

    def to_host(self) -> None:
        for name, tensor in self._tensors():
            tensor.data = self.host[name]


@contextlib.contextmanager
def resident(module: torch.nn.Module, *, offload: bool) -> Iterator[None]:
    """With ``offload``, ``module`` (frozen) lives in host memory and is on this rank's device only inside the
    block (the teacher outside its scoring phase, ``trainer.offload_teacher``), through its :class:`HostCopy`."""
    if not offload:
        yield
        return
    copy = module.__dict__.setdefault("_xopd_host_copy", HostCopy(module))
    copy.to_device(current_device())
    try:
        yield
    finally:
        copy.to_host()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
