"""Megatron ``parallel_state`` set-up from a typed config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
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


# megatron-core's TransformerConfig fields of an uneven pipeline split, the ``trainer.parallel`` keys of the same name
SPLIT_KEYS = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
              "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split")

_current_split: dict[str, Any] = {}  # the split of the layout initialize_model_parallel set up


def current_pipeline_split() -> dict[str, Any]:
    """The uneven pipeline split (``TransformerConfig`` keyword arguments, empty for megatron's even split) of the
    layout :func:`initialize_model_parallel` set up: every model built under it gets it, as it gets TP and PP."""
    return dict(_current_split)


def _split_config(num_layers: int, pp: int, vpp: int | None, split: dict[str, Any]) -> Any:
    """A minimal megatron ``TransformerConfig`` of the pipeline split: its ``__post_init__`` validates the split."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=num_layers, hidden_size=8, num_attention_heads=1,
                             pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                             pipeline_dtype=torch.float32, **split)


def stage_layer_counts(num_layers: int, pp: int, vpp: int | None = None,
                       split: dict[str, Any] | None = None) -> list[int]:
    """The decoder layers of each pipeline rank (summed over its virtual chunks), as megatron-core builds them
    (``get_num_layers_to_build``): even, or per the uneven ``split``. Raises megatron's ``ValueError`` or
    ``AssertionError`` when the split does not fit."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    config = _split_config(num_layers, pp, vpp if vpp and vpp > 1 else None, split or {})
    chunks = range(vpp) if vpp and vpp > 1 else [None]
    return [sum(get_num_layers_to_build(config, vp_stage=v, pp_rank=r) for v in chunks) for r in range(pp)]


def stage_layer_numbers(num_layers: int, pp: int, vpp: int | None, split: dict[str, Any] | None,
                        stage: int) -> list[int]:
    """The global (0-based) layer numbers on pipeline rank ``stage``, from megatron-core's
    ``get_transformer_layer_offset`` and ``get_num_layers_to_build`` (its interleaved chunks at virtual PP)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    vpp = vpp if vpp and vpp > 1 else None
    config = _split_config(num_layers, pp, vpp, split or {})
    out = []
    for v in range(vpp) if vpp else [None]:
        start = get_transformer_layer_offset(config, vp_stage=v, pp_rank=stage)
        out += range(start, start + get_num_layers_to_build(config, vp_stage=v, pp_rank=stage))
    return out


def _split_problem(num_layers: int, pp: int, vpp: int | None, split: dict[str, Any], where: str, key: str) -> str | None:
    """Why ``num_layers`` layers cannot be split over PP ``pp`` (x ``vpp``) as ``split`` says, naming the keys;
    the clear cases first, then megatron-core's own validation (its message)."""
    first, last = split.get("num_layers_in_first_pipeline_stage"), split.get("num_layers_in_last_pipeline_stage")
    given = {k: v for k, v in split.items() if v}
    stages = f"{key}pipeline_model_parallel_size ({pp})"
    if given and pp == 1:
        return f"{key}{next(iter(given))} needs pipeline_model_parallel_size > 1"
    if (first is not None or last is not None) and any(split.get(k) for k in SPLIT_KEYS[2:]):
        return (f"{key}num_layers_in_first/last_pipeline_stage and {key}account_for_*_in_pipeline_split are "
                "exclusive in megatron-core")
    fixed = [(k, v) for k, v in (("num_layers_in_first_pipeline_stage", first),
                                  ("num_layers_in_last_pipeline_stage", last)) if v is not None]
    for k, v in fixed:
        if v < 1:
            return f"{key}{k} must be >= 1, got {v}"
    if fixed:
        rest, middle = num_layers - sum(v for _, v in fixed), pp - len(fixed)
        named = " + ".join(f"{key}{k} ({v})" for k, v in fixed)
        if middle == 0 and rest:
            return f"{where}.num_layers ({num_layers}) is not {named}: {stages} has no other stage"
        if middle and (rest < middle or rest % middle):
            return (f"{where}.num_layers ({num_layers}) minus {named} leaves {rest} layer(s), not a positive "
                    f"multiple of the {middle} other stage(s) of {stages}")
    elif given:
        total = num_layers + sum(1 for k in SPLIT_KEYS[2:] if split.get(k))
        if total % pp:
            named = " + ".join(f"1 ({key}{k})" for k in SPLIT_KEYS[2:] if split.get(k))
            return f"{where}.num_layers ({num_layers}) + {named} = {total} is not divisible by {stages}"
    try:
        counts = stage_layer_counts(num_layers, pp, vpp, split)
    except (ValueError, AssertionError) as err:
        return f"{where}: the pipeline split {given or 'even'} does not fit {stages}: {err}"
    if not all(counts):
        return f"{where}: the pipeline split {given} leaves a stage of {stages} without layers ({counts})"
    return None


def split_problems(
    cfg: Any,
    tp: int,
    pp: int,
    ep: int = 1,
    etp: int | None = None,
    vpp: int | None = None,
    *,
    split: dict[str, Any] | None = None,
    where: str = "model",
    key: str = "",
) -> list[str]:
    """Every reason a model of ``cfg`` (a :class:`~megatron_xopd.models.GPTModelConfig`) cannot be split over TP
    ``tp``, PP ``pp`` x virtual PP ``vpp`` (evenly, or per the uneven ``split``: :data:`SPLIT_KEYS` values), EP
    ``ep`` and expert TP ``etp`` (default ``tp``), one line each naming the model field as ``{where}.field`` and
    the layout size as ``{key}name``: the one owner of these rules."""
    etp = tp if etp is None else etp
    split = {k: v for k, v in (split or {}).items() if v is not None and v is not False}
    stages = f"pipeline_model_parallel_size ({pp})"
    if vpp is not None and vpp > 1:
        stages += f" x {key}virtual_pipeline_model_parallel_size ({vpp})"
    experts = getattr(cfg, "num_moe_experts", None) or 0
    dense = not experts or not all(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    checks = [
        ("num_attention_heads", cfg.num_attention_heads, tp, f"tensor_model_parallel_size ({tp})"),
        ("num_query_groups", cfg.num_query_groups, tp, f"tensor_model_parallel_size ({tp})"),
        ("ffn_hidden_size", cfg.ffn_hidden_size if dense else 0, tp, f"tensor_model_parallel_size ({tp})"),
        ("num_layers", 0 if split else cfg.num_layers, pp * (vpp or 1), stages),
        ("padded_vocab_size", cfg.padded_vocab_size or 0, tp, f"tensor_model_parallel_size ({tp})"),
        ("num_moe_experts", experts, ep, f"expert_model_parallel_size ({ep})"),
        ("moe_ffn_hidden_size", cfg.expert_ffn_hidden_size if experts else 0, etp,
         f"expert_tensor_parallel_size ({etp})"),
        ("moe_shared_expert_intermediate_size", getattr(cfg, "moe_shared_expert_intermediate_size", None) or 0, tp,
         f"tensor_model_parallel_size ({tp})"),
    ]
    out = [f"{where}.{field} ({value}) is not divisible by {key}{what}"
           for field, value, size, what in checks if value % size]
    problem = _split_problem(cfg.num_layers, pp, vpp, split, where, key) if split else None
    return out + ([problem] if problem else [])


@dataclass
class ParallelConfig:
    """The parallel layout of a run (``trainer.parallel``). The data-parallel size is what the world size leaves.

    ``use_distributed_optimizer`` shards the optimizer state over DP; ``None`` uses it when DP > 1, ``True``
    also at DP = 1 (checkpoints then move between DP sizes: the optimizer state keeps one format).
    ``overlap_grad_reduce`` starts megatron DDP's bucketed gradient reduction during the backward.

    The pipeline split is megatron-core's: even by default; ``num_layers_in_first_pipeline_stage`` /
    ``num_layers_in_last_pipeline_stage`` fix those stages' layers (the others share the rest evenly), or
    ``account_for_embedding_in_pipeline_split`` / ``account_for_loss_in_pipeline_split`` count the embedding / the
    output layer and loss as one layer each (the first / last stage builds one layer less). Every model built under
    the layout (student LLM, teacher) gets it, so it must fit each of them.
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
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    account_for_embedding_in_pipeline_split: bool = False
    account_for_loss_in_pipeline_split: bool = False

    def pipeline_split(self) -> dict[str, Any]:
        """The set :data:`SPLIT_KEYS` fields, as ``TransformerConfig`` keyword arguments (empty: even split)."""
        return {k: getattr(self, k) for k in SPLIT_KEYS if getattr(self, k) is not None and getattr(self, k) is not False}

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
            out += split_problems(cfg, tp, pp, ep, etp, vpp, split=self.pipeline_split(), where=where, key=f"{key}.")
            if getattr(cfg, "num_moe_experts", None) and tp > 1 and not self.sequence_parallel:
                out.append(f"{where} is a mixture of experts: megatron-core needs {key}.sequence_parallel=true "
                           f"with tensor_model_parallel_size ({tp}) > 1")
        return list(dict.fromkeys(out))  # the split's own problems once, not once per model

    def validate(self, world_size: int, *models: tuple[str, Any]) -> None:
        """Raise one :class:`LayoutError` listing every problem of :meth:`problems`."""
        found = self.problems(world_size, *models)
        if found:
            raise LayoutError("parallel layout does not fit:\n  " + "\n  ".join(found))


def initialize_model_parallel(cfg: ParallelConfig, timeout_minutes: int = 30) -> None:
    """Create Megatron's TP/PP/CP/EP/DP groups (``torch.distributed`` must be initialised).

    On CPU the CPU compatibility layer is switched on first, so megatron-core's CUDA-only code paths run.
    Re-initialising with a different layout destroys the previous groups. The layout's pipeline split is kept
    for the models built under it (:func:`current_pipeline_split`).
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
    _current_split.clear()
    _current_split.update(cfg.pipeline_split() if cfg.pipeline_model_parallel_size > 1 else {})


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    _current_split.clear()
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
