"""Move weights between a rank's model shard and the full, unsharded ("canonical") state dict.

The canonical form uses megatron-core's parameter names with *global* layer numbers and the
unpadded vocabulary (``cfg.vocab_size`` rows), i.e. what a TP=1/PP=1 model holds minus the padding.
It is the meeting point of the HF converters, the parity tests and the exporters. Slicing follows the
tensor-parallel attributes megatron sets on each parameter (``partition_dim``, ``partition_stride``:
SwiGLU's ``linear_fc1`` has stride 2, so each rank holds its slice of gate and of up). For large models
the converters write megatron ``dist_checkpointing`` checkpoints, which reshard at load time.

MoE layers: experts carry their *global* index (``mlp.experts.local_experts.{e}``, e over all experts, as an
EP=1 model names them); expert weights are sliced over the expert-tensor-parallel group and gathered over it and
the expert-parallel group. An MoE layer keeps its ``pre_mlp_layernorm`` (there is no fused ``linear_fc1`` to
hold it, in either spec).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

_LAYER = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")
_EXPERT = re.compile(r"^(\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


# megatron's local (torch) spec keeps the pre-attention/pre-MLP norms as modules of their own; the Transformer
# Engine spec fuses them into the following linear. Canonical names are the TE ones (those of GPU checkpoints).
_LOCAL_NORMS = {
    ".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
    ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight",
}


def local_to_global_name(model: torch.nn.Module, name: str) -> str:
    """A rank's parameter name -> its canonical name: global layer number, TE-style fused norm names."""
    match = _LAYER.match(name)
    if match is None:
        return name
    inner = _unwrap(model)
    config = inner.config
    offset = get_transformer_layer_offset(config, getattr(inner, "vp_stage", None))
    suffix = match.group(3)
    moe_layer = config.num_moe_experts and hasattr(inner.decoder.layers[int(match.group(2))].mlp, "router")
    for local, fused in _LOCAL_NORMS.items():
        if suffix.endswith(local) and not (local.startswith(".pre_mlp") and moe_layer):
            suffix = suffix[: -len(local)] + fused
    expert = _EXPERT.match(suffix)
    if expert is not None:
        num_local = config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
        first = parallel_state.get_expert_model_parallel_rank() * num_local
        suffix = f"{expert.group(1)}{int(expert.group(2)) + first}{expert.group(3)}"
    return f"{match.group(1)}{int(match.group(2)) + offset}{suffix}"


def _is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def _tp_group_of(name: str) -> tuple[int, int, "dist.ProcessGroup"]:
    """(rank, size, group) of the tensor-parallel group that splits parameter ``name``: expert weights are
    split over the expert-tensor-parallel group, everything else over the TP group."""
    if _is_expert(name):
        return (parallel_state.get_expert_tensor_parallel_rank(), parallel_state.get_expert_tensor_parallel_world_size(),
                parallel_state.get_expert_tensor_parallel_group())
    return (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_group())


def _tp_slice(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = full.chunk(stride * tp_size, dim=dim)
    return torch.cat(chunks[tp_rank::tp_size], dim=dim)


def _pad_vocab(full: torch.Tensor, rows: int) -> torch.Tensor:
    if full.shape[0] > rows:
        raise ValueError(f"vocabulary tensor has {full.shape[0]} rows, more than the padded size {rows}")
    if full.shape[0] == rows:
        return full
    return torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])


@torch.no_grad()
def load_canonical_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    """Copy this rank's slices of ``full`` (canonical form) into ``model``'s parameters and buffers."""
    inner = _unwrap(model)
    missing = []
    for name, param in inner.named_parameters():
        tp_rank, tp_size, _ = _tp_group_of(name)
        key = local_to_global_name(inner, name)
        if key == "output_layer.weight" and key not in full and inner.share_embeddings_and_output_weights:
            key = "embedding.word_embeddings.weight"  # tied: the last PP stage keeps its own copy
        if key not in full:
            missing.append(key)
            continue
        tensor = full[key]
        if name.endswith(_VOCAB_PARAMS):
            tensor = _pad_vocab(tensor, param.shape[0] * tp_size)
        shard = _tp_slice(tensor, param, tp_rank, tp_size)
        if shard.shape != param.shape:
            raise ValueError(f"{key}: checkpoint shard {tuple(shard.shape)} does not fit parameter {tuple(param.shape)}")
        param.copy_(shard)
    if strict and missing:
        raise KeyError(f"canonical state dict lacks {len(missing)} parameter(s), e.g. {missing[:5]}")


@torch.no_grad()
def gather_canonical_state_dict(
    model: torch.nn.Module, vocab_size: int, *, grads: bool = False, dst_all: bool = True
) -> dict[str, torch.Tensor]:
    """The full canonical state dict (or gradients, with ``grads=True``), assembled over TP and PP.

    Every rank receives it (an all-gather over TP, then the experts over EP, then over PP). This materialises the
    whole model on each rank: for tests and small models. Exports stream instead (:func:`iter_canonical_tensors`).
    """
    inner = _unwrap(model)
    local: dict[str, torch.Tensor] = {}
    for name, param in inner.named_parameters():
        _, tp_size, tp_group = _tp_group_of(name)
        tensor = param.main_grad if grads and hasattr(param, "main_grad") else (param.grad if grads else param)
        if tensor is None:
            tensor = torch.zeros_like(param)
        tensor = tensor.detach().contiguous()
        if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
            parts = [torch.empty_like(tensor) for _ in range(tp_size)]
            dist.all_gather(parts, tensor, group=tp_group)
            stride = getattr(param, "partition_stride", 1)
            per_rank = [p.chunk(stride, dim=param.partition_dim) for p in parts]
            tensor = torch.cat([per_rank[r][k] for k in range(stride) for r in range(tp_size)], dim=param.partition_dim)
        if name.endswith(_VOCAB_PARAMS):
            tensor = tensor[:vocab_size]
        if name == "output_layer.weight" and inner.share_embeddings_and_output_weights:
            continue  # tied: the canonical form holds the embedding only
        local[local_to_global_name(inner, name)] = tensor
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        experts = {k: v for k, v in local.items() if _is_expert(k)}
        parts: list[dict[str, torch.Tensor] | None] = [None] * parallel_state.get_expert_model_parallel_world_size()
        dist.all_gather_object(parts, experts, group=parallel_state.get_expert_model_parallel_group())
        for part in parts:
            local.update(part)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        stages: list[dict[str, torch.Tensor] | None] = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(stages, local, group=parallel_state.get_pipeline_model_parallel_group())
        merged: dict[str, torch.Tensor] = {}
        for stage in stages:
            for key, value in stage.items():
                merged.setdefault(key, value)  # tied embeddings appear on first and last stage
        local = merged
    return local


# ------------------------------------------------------------------------------------------- streaming gather
@dataclass(frozen=True)
class CanonicalTensor:
    """One canonical tensor as the ranks hold it: its full shape (vocabulary rows unpadded) and dtype, the shape of
    each TP piece, which global rank sends each piece, and how the pieces join (``dim``, ``stride``; one piece when
    the tensor is not TP-split)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    piece: tuple[int, ...]
    senders: tuple[int, ...]
    dim: int = 0
    stride: int = 1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _canonical_params(inner: torch.nn.Module) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    for name, param in inner.named_parameters():
        if name == "output_layer.weight" and inner.share_embeddings_and_output_weights:
            continue  # tied: the canonical form holds the embedding only
        yield name, local_to_global_name(inner, name), param


def canonical_layout(model: torch.nn.Module, vocab_size: int) -> list[CanonicalTensor]:
    """Every canonical tensor of the whole (sharded) model, in one order all ranks agree on (collective).

    Only names and shapes travel (``all_gather_object`` of metadata); each piece is sent by the lowest global rank
    that holds it, so data-parallel replicas send nothing.
    """
    inner = _unwrap(model)
    local = []
    for name, key, param in _canonical_params(inner):
        tp_rank, tp_size, _ = _tp_group_of(name)
        split = bool(getattr(param, "tensor_model_parallel", False)) and tp_size > 1
        shape = list(param.shape)
        if split:
            shape[param.partition_dim] *= tp_size
        if name.endswith(_VOCAB_PARAMS):
            shape[0] = vocab_size
        local.append((key, tuple(shape), str(param.dtype).removeprefix("torch."), tuple(param.shape),
                      tp_rank if split else 0, tp_size if split else 1, param.partition_dim if split else 0,
                      getattr(param, "partition_stride", 1) if split else 1))
    everyone: list = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
    merged: dict[str, dict] = {}
    for src, entries in enumerate(everyone):
        for key, shape, dtype, piece_shape, piece, pieces, dim, stride in entries:
            entry = merged.setdefault(key, dict(shape=shape, dtype=getattr(torch, dtype), piece=piece_shape,
                                                senders=[None] * pieces, dim=dim, stride=stride))
            if entry["senders"][piece] is None:
                entry["senders"][piece] = src
    return [CanonicalTensor(key, **{**e, "senders": tuple(e["senders"])})
            for key, e in sorted(merged.items(), key=lambda kv: _natural(kv[0]))]


@torch.no_grad()
def iter_canonical_tensors(
    model: torch.nn.Module, layout: list[CanonicalTensor], *, dst: int = 0
) -> Iterator[tuple[CanonicalTensor, torch.Tensor | None]]:
    """Each tensor of ``layout`` (:func:`canonical_layout`) in turn, assembled on global rank ``dst`` only, from
    point-to-point sends of its TP pieces; the other ranks get ``None`` and must iterate to the end too (they send).

    Why: an export must not hold the whole model on any rank (``gather_canonical_state_dict`` gives every rank all
    of it). ``dst`` holds one full tensor and its pieces at a time beyond its own shard; no other rank receives.
    """
    inner = _unwrap(model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = {key: param for _, key, param in _canonical_params(inner)}
    device = next(inner.parameters()).device
    for entry in layout:
        if rank != dst:
            if rank in entry.senders:
                dist.send(mine[entry.name].detach().contiguous(), dst=dst)
            yield entry, None
            continue
        parts = []
        for src in entry.senders:
            if src == rank:
                parts.append(mine[entry.name].detach())
            else:
                parts.append(torch.empty(entry.piece, dtype=entry.dtype, device=device))
                dist.recv(parts[-1], src=src)
        if len(parts) == 1:
            tensor = parts[0]
        else:
            per_rank = [p.chunk(entry.stride, dim=entry.dim) for p in parts]
            tensor = torch.cat([per_rank[r][k] for k in range(entry.stride) for r in range(len(parts))], dim=entry.dim)
        del parts
        yield entry, tensor[: entry.shape[0]] if tensor.shape[0] != entry.shape[0] else tensor
