"""Megatron ``parallel_state`` set-up from a typed config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from .cpu_compat import maybe_enable_cpu_compat


class LayoutError(ValueError):
    """A parallel layout that cannot hold the models or the world size; the message names the keys."""


def _grid(world_size: int, sizes: tuple[tuple[str, int], ...], key: str) -> str | None:
    """The problem when ``world_size`` is not divisible by the product of ``sizes``, else None."""
    product = 1
    for _, size in sizes:
        product *= size
    if world_size % product == 0:
        return None
    return f"{key}: world size {world_size} is not divisible by " + " x ".join(f"{n} ({v})" for n, v in sizes)


def split_problems(
    cfg: Any,
    tp: int,
    pp: int,
    ep: int = 1,
    etp: int | None = None,
    vpp: int | None = None,
    *,
    where: str = "model",
    key: str = "",
) -> list[str]:
    """Every reason a model of ``cfg`` (a :class:`~megatron_xopd.models.GPTModelConfig`) cannot be split over TP
    ``tp``, PP ``pp`` x virtual PP ``vpp``, EP ``ep`` and expert TP ``etp`` (default ``tp``), one line each naming
    the model field as ``{where}.field`` and the layout size as ``{key}name``: the one owner of these rules."""
    etp = tp if etp is None else etp
    stages = f"pipeline_model_parallel_size ({pp})"
    if vpp is not None and vpp > 1:
        stages += f" x {key}virtual_pipeline_model_parallel_size ({vpp})"
    experts = getattr(cfg, "num_moe_experts", None) or 0
    dense = not experts or not all(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    checks = [
        ("num_attention_heads", cfg.num_attention_heads, tp, f"tensor_model_parallel_size ({tp})"),
        ("num_query_groups", cfg.num_query_groups, tp, f"tensor_model_parallel_size ({tp})"),
        ("ffn_hidden_size", cfg.ffn_hidden_size if dense else 0, tp, f"tensor_model_parallel_size ({tp})"),
        ("num_layers", cfg.num_layers, pp * (vpp or 1), stages),
        ("padded_vocab_size", cfg.padded_vocab_size or 0, tp, f"tensor_model_parallel_size ({tp})"),
        ("num_moe_experts", experts, ep, f"expert_model_parallel_size ({ep})"),
        ("moe_ffn_hidden_size", cfg.expert_ffn_hidden_size if experts else 0, etp,
         f"expert_tensor_parallel_size ({etp})"),
        ("moe_shared_expert_intermediate_size", getattr(cfg, "moe_shared_expert_intermediate_size", None) or 0, tp,
         f"tensor_model_parallel_size ({tp})"),
    ]
    return [f"{where}.{field} ({value}) is not divisible by {key}{what}"
            for field, value, size, what in checks if value % size]


@dataclass
class ParallelConfig:
    """The parallel layout of a run (``trainer.parallel``). The data-parallel size is what the world size leaves.

    ``use_distributed_optimizer`` shards the optimizer state over DP; ``None`` uses it when DP > 1, ``True``
    also at DP = 1 (checkpoints then move between DP sizes: the optimizer state keeps one format).
    ``overlap_grad_reduce`` starts megatron DDP's bucketed gradient reduction during the backward.
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool | None = None
    overlap_grad_reduce: bool = False

    def _dense_grid(self) -> tuple[tuple[str, int], ...]:
        return (("tensor_model_parallel_size", self.tensor_model_parallel_size),
                ("pipeline_model_parallel_size", self.pipeline_model_parallel_size),
                ("context_parallel_size", self.context_parallel_size))

    def data_parallel_size(self, world_size: int) -> int:
        problem = _grid(world_size, self._dense_grid(), "parallel")
        if problem:
            raise LayoutError(problem)
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                              * self.context_parallel_size)

    def problems(self, world_size: int, *models: tuple[str, Any]) -> list[str]:
        """Every reason this layout cannot run ``models`` (``(name, GPTModelConfig)`` pairs) on ``world_size``
        ranks, one line each naming the ``trainer.parallel`` key and the model field; empty when it fits."""
        key = "trainer.parallel"
        tp, pp, cp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.context_parallel_size
        ep, etp = self.expert_model_parallel_size, self.expert_tensor_parallel_size or tp
        vpp = self.virtual_pipeline_model_parallel_size
        out = []
        for name, size in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                           ("context_parallel_size", cp), ("expert_model_parallel_size", ep),
                           ("expert_tensor_parallel_size", etp), ("virtual_pipeline_model_parallel_size", vpp or 1)):
            if size < 1:
                out.append(f"{key}.{name} must be >= 1, got {size}")
        if out:
            return out
        expert_grid = (("expert_tensor_parallel_size", etp), ("expert_model_parallel_size", ep),
                       ("pipeline_model_parallel_size", pp))
        out += [p for p in (_grid(world_size, self._dense_grid(), key), _grid(world_size, expert_grid, key)) if p]
        if vpp is not None and vpp > 1 and pp == 1:
            out.append(f"{key}.virtual_pipeline_model_parallel_size ({vpp}) needs pipeline_model_parallel_size > 1")
        for where, cfg in models:
            out += split_problems(cfg, tp, pp, ep, etp, vpp, where=where, key=f"{key}.")
            if getattr(cfg, "num_moe_experts", None) and tp > 1 and not self.sequence_parallel:
                out.append(f"{where} is a mixture of experts: megatron-core needs {key}.sequence_parallel=true "
                           f"with tensor_model_parallel_size ({tp}) > 1")
        return out

    def validate(self, world_size: int, *models: tuple[str, Any]) -> None:
        """Raise one :class:`LayoutError` listing every problem of :meth:`problems`."""
        found = self.problems(world_size, *models)
        if found:
            raise LayoutError("parallel layout does not fit:\n  " + "\n  ".join(found))


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


def expert_parallel_group(config: Any) -> "dist.ProcessGroup | None":
    """The expert-model-parallel group when a model of ``config`` (a megatron ``TransformerConfig``) has MoE layers
    and EP > 1, else None.

    Each forward of an MoE layer then runs an all-to-all over this group, whose ranks are different data-parallel
    ranks with different inputs: every rank of it must make the same number of forward calls (rollout steps,
    micro-batches), or the ones that stop early leave the others waiting in the all-to-all.
    """
    from megatron.core import parallel_state

    if not getattr(config, "num_moe_experts", None) or parallel_state.get_expert_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_expert_model_parallel_group()
