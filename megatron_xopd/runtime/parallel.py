"""Megatron ``parallel_state`` set-up from a typed config."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from .cpu_compat import maybe_enable_cpu_compat


@dataclass
class ParallelConfig:
    """Model-parallel layout. The data-parallel size is what the world size leaves."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = (
            self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        )
        if world_size % model_parallel:
            raise ValueError(
                f"parallel: world size {world_size} is not divisible by tensor_model_parallel_size "
                f"({self.tensor_model_parallel_size}) x pipeline_model_parallel_size "
                f"({self.pipeline_model_parallel_size}) x context_parallel_size ({self.context_parallel_size})"
            )
        return world_size // model_parallel


def initialize_model_parallel(cfg: ParallelConfig, timeout_minutes: int = 30) -> None:
    """Create Megatron's TP/PP/CP/EP/DP groups (``torch.distributed`` must be initialised).

    On CPU the CPU compatibility layer is switched on first, so megatron-core's CUDA-only code paths run.
    Re-initialising with a different layout destroys the previous groups.
    """
    from megatron.core import parallel_state

    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel: call megatron_xopd.runtime.init_distributed() first")
    maybe_enable_cpu_compat()
    cfg.data_parallel_size(dist.get_world_size())  # validates divisibility with a clear message
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        expert_tensor_parallel_size=cfg.expert_tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
