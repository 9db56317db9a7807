"""megatron-core ``dist_checkpointing`` checkpoints of our GPT models, converted from and exported to HF.

A converted checkpoint directory holds:

* the ``dist_checkpointing`` files (``metadata.json``, ``common.pt``, ``*.distcp``): each rank saves its shard,
  and :func:`load_mcore_checkpoint` reshards them to whatever TP/PP layout loads them;
* ``model_config.yaml``: the :class:`GPTModelConfig` (:meth:`GPTModelConfig.save`);
* ``hf_config.json`` (the source ``config.json``, kept for the export: token ids etc.), the tokenizer files and
  ``generation_config.json`` of the source.

All functions here run on every rank of an initialised ``parallel_state`` (torchrun, or one plain process).
``dist_checkpointing``'s writer starts helper processes, so scripts that call them need an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from ..models.config import GPTModelConfig
from ..models.gpt import build_gpt_model, uses_transformer_engine
from ..models.sharding import canonical_layout, iter_canonical_tensors, load_canonical_state_dict, local_to_global_name
from ..runtime import set_seed

from .hf import (
    CanonicalToHF,
    ConversionError,
    StreamingSafetensorsWriter,
    HFCheckpoint,
    check_hf_expert_count,
    check_hf_keys,
    copy_tokenizer_files,
    hf_config_to_model_config,
    hf_to_canonical,
    model_config_to_hf_config,
    read_json,
)

log = logging.getLogger(__name__)

MODEL_CONFIG = "model_config.yaml"
HF_CONFIG = "hf_config.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def raise_together(error: Exception | None) -> None:
    """Raise on every rank when any rank has an ``error``: a rank that raises alone leaves the others in their next
    collective until its timeout (torchrun stops them; a plain ``srun`` does not)."""
    if not dist.is_initialized():
        if error is not None:
            raise error
        return
    from ..runtime.device import current_device
    from ..runtime.reduce import max_over_group

    [failed] = max_over_group([dist.get_rank() if error is not None else -1], dist.group.WORLD, current_device())
    if error is not None:
        raise error
    if failed >= 0:
        raise ConversionError(f"rank {failed} failed (its error is in its output)")


def _tokenizer_size(path: Path) -> int | None:
    """``len(tokenizer)`` of the tokenizer in ``path``, or None when there is none."""
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(path)))


# --------------------------------------------------------------------------------------------- dist_checkpointing


def save_mcore_checkpoint(model: torch.nn.Module, out_dir: str | Path) -> None:
    """``dist_checkpointing.save(model.sharded_state_dict(), out_dir)`` into a new or empty directory."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):  # every rank checks (before rank 0 writes), so all raise together
        raise FileExistsError(f"checkpoint directory {out} is not empty")
    _barrier()
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(out))


def _experts_per_layer(shapes: dict[str, Any]) -> int:
    """The expert count of the routers among ``{key: sharded tensor or its metadata}`` (0: no MoE layer)."""
    routers = {v.global_shape[0] for k, v in shapes.items() if k.endswith("mlp.router.weight") and hasattr(v, "global_shape")}
    return max(routers, default=0)


def check_expert_count(sharded_state_dict: dict[str, Any], ckpt_dir: str | Path) -> None:
    """Raise naming ``model.num_moe_experts`` when the checkpoint's routers have another number of experts than
    the model's (megatron's own error would be a shape mismatch deep in the loader)."""
    experts = _experts_per_layer(sharded_state_dict)
    if not experts:  # no MoE layer on this pipeline stage
        return
    saved = _experts_per_layer(dist_checkpointing.load_tensors_metadata(str(ckpt_dir)))
    if saved != experts:
        raise ConversionError(f"model.num_moe_experts ({experts}) differs from the {saved} experts per MoE layer "
                              f"of the checkpoint {ckpt_dir}")


def load_mcore_checkpoint(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Load a ``dist_checkpointing`` checkpoint into ``model`` (this rank's shard), whatever TP/PP/EP saved it."""
    ckpt = Path(ckpt_dir)
    if not (ckpt / "metadata.json").is_file():
        raise FileNotFoundError(f"{ckpt} is not a megatron dist_checkpointing checkpoint (no metadata.json)")
    sharded = model.sharded_state_dict()
    check_expert_count(sharded, ckpt)
    state = dist_checkpointing.load(sharded, str(ckpt))
    model.load_state_dict(state, strict=True)


def load_model_config(ckpt_dir: str | Path) -> GPTModelConfig:
    return GPTModelConfig.load(Path(ckpt_dir) / MODEL_CONFIG)


def build_gpt_from_mcore(ckpt_dir: str | Path, **config_overrides: Any) -> tuple[torch.nn.Module, GPTModelConfig]:
    """Build this rank's GPT shard from ``model_config.yaml`` (fields overridable) and load its weights.

    The caller sets megatron's RNG tracker first (:func:`megatron_xopd.runtime.set_seed`), as for any build.
    """
    cfg = load_model_config(ckpt_dir)
    for key, value in config_overrides.items():
        setattr(cfg, key, value)
    model = build_gpt_model(cfg)
    load_mcore_checkpoint(model, ckpt_dir)
    return model, cfg


# --------------------------------------------------------------------------------------------- HF -> MCore


def _bridge_for(hf_dir: Path, cfg: GPTModelConfig):
    """NVIDIA Megatron-Bridge's ``AutoBridge`` when it is installed, supports the model, and the model uses the
    Transformer Engine spec its mapping registry is written for; None otherwise (our mapping is used)."""
    if not uses_transformer_engine(cfg) or importlib.util.find_spec("megatron.bridge") is None:
        return None
    try:
        from megatron.bridge import AutoBridge
    except ImportError:
        return None
    try:
        config = read_json(hf_dir / "config.json")
        supports = getattr(AutoBridge, "supports", None)
        if supports is not None and not supports(config):
            return None
        return AutoBridge.from_hf_pretrained(str(hf_dir))
    except Exception as err:  # noqa: BLE001 - an unsupported model: our mapping handles it
        log.warning("Megatron-Bridge cannot handle %s (%s); using megatron_xopd's HF mapping", hf_dir, err)
        return None


def prepare_hf_conversion(
    hf_dir: str | Path,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    expert_parallel_size: int = 1,
    *,
    params_dtype: str | None = None,
) -> tuple[GPTModelConfig, HFCheckpoint]:
    """Check an HF directory before any process group exists: architecture, shards, tensor names, TP/PP/EP split.

    Errors name the unsupported architecture, the missing shard file, an expert count that differs from
    ``config.json num_experts``, or the config field TP/PP/EP does not divide.
    """
    reader = HFCheckpoint(hf_dir)
    cfg = hf_config_to_model_config(reader.config, params_dtype=params_dtype, text_vocab_size=_tokenizer_size(reader.path))
    check_hf_expert_count(reader.keys(), reader.config)
    check_hf_keys(reader.keys(), cfg)
    cfg.validate_parallel(tensor_parallel_size, pipeline_parallel_size, expert_parallel_size)
    return cfg, reader


def needed_canonical_keys(model: torch.nn.Module) -> set[str]:
    """Canonical names of the parameters this rank holds (the tied output layer reads the embedding)."""
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    keys = set()
    for name, _ in inner.named_parameters():
        key = local_to_global_name(inner, name)
        if key == "output_layer.weight" and inner.share_embeddings_and_output_weights:
            key = "embedding.word_embeddings.weight"
        keys.add(key)
    return keys


def load_hf_weights(model: torch.nn.Module, reader: HFCheckpoint, cfg: GPTModelConfig) -> None:
    """Fill this rank's shard from HF tensors, reading only the tensors of its parameters."""
    bridge = _bridge_for(reader.path, cfg)
    if bridge is not None:
        bridge.load_hf_weights([model], hf_path=str(reader.path))
        return
    canonical = hf_to_canonical(reader, cfg, keys=needed_canonical_keys(model))
    load_canonical_state_dict(model, canonical)


def write_hf_side_files(src_dir: Path, out_dir: Path, cfg: GPTModelConfig, hf_config: dict[str, Any]) -> None:
    cfg.save(out_dir / MODEL_CONFIG)
    (out_dir / HF_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
    copy_tokenizer_files(src_dir, out_dir)


def convert_hf_to_mcore(
    hf_dir: str | Path, out_dir: str | Path, *, params_dtype: str | None = None, seed: int = 0
) -> GPTModelConfig:
    """HF directory -> ``dist_checkpointing`` checkpoint, under the current TP/PP/EP layout (every rank calls it).

    Each rank builds its shard, reads the HF tensors of its own parameters and saves its part; rank 0 writes
    ``model_config.yaml``, ``hf_config.json`` and the tokenizer files.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    cfg, reader = prepare_hf_conversion(hf_dir, tp, pp, ep, params_dtype=params_dtype)
    set_seed(seed)  # megatron's RNG tracker must exist to build; the weights are overwritten
    model = build_gpt_model(cfg)
    load_hf_weights(model, reader, cfg)
    save_mcore_checkpoint(model, out_dir)
    if _rank() == 0:
        write_hf_side_files(reader.path, Path(out_dir), cfg, reader.config)
    _barrier()
    return cfg


# --------------------------------------------------------------------------------------------- MCore -> HF


def export_model_to_hf(
    model: torch.nn.Module,
    cfg: GPTModelConfig,
    out_dir: str | Path,
    *,
    side_files_dir: str | Path | None = None,
    hf_config: dict[str, Any] | None = None,
) -> Path:
    """Write this (sharded) model as an HF directory that ``AutoModelForCausalLM.from_pretrained`` loads.

    Every rank calls it; rank 0 writes. The weights stream tensor by tensor: each is gathered over TP/EP/PP to rank 0
    only (:func:`iter_canonical_tensors`), converted to its HF names and written into its safetensors file, so no
    rank holds more than its own shard and one full tensor. ``side_files_dir`` (a converted checkpoint) provides
    ``hf_config.json`` and the tokenizer files.
    """
    out = Path(out_dir)
    side = Path(side_files_dir) if side_files_dir is not None else None
    if hf_config is None and side is not None and (side / HF_CONFIG).is_file():
        hf_config = read_json(side / HF_CONFIG)
    layout = canonical_layout(model, cfg.vocab_size)
    to_hf = CanonicalToHF(cfg)
    to_hf.check(entry.name for entry in layout)
    writer = None
    if _rank() == 0:
        config = model_config_to_hf_config(cfg, base=hf_config)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        writer = StreamingSafetensorsWriter(
            out, [p for entry in layout for p in to_hf.plan(entry.name, entry.shape, entry.dtype)])
    for entry, tensor in iter_canonical_tensors(model, layout):
        if writer is not None:
            for name, part in to_hf(entry.name, tensor):
                writer.write(name, part)
        del tensor
    if writer is not None:
        writer.close()
        if side is not None:
            copy_tokenizer_files(side, out)
    _barrier()
    return out


def export_mcore_to_hf(
    ckpt_dir: str | Path, out_dir: str | Path, *, meta_dir: str | Path | None = None, seed: int = 0
) -> Path:
    """``dist_checkpointing`` checkpoint -> HF directory, under the current TP/PP layout (any layout: it reshards).

    ``meta_dir`` holds ``model_config.yaml``, ``hf_config.json`` and the tokenizer when ``ckpt_dir`` (e.g. a
    training checkpoint) has only the ``dist_checkpointing`` files; defaults to ``ckpt_dir``.
    """
    meta_dir = ckpt_dir if meta_dir is None else meta_dir
    set_seed(seed)
    cfg = load_model_config(meta_dir)
    model = build_gpt_model(cfg)
    load_mcore_checkpoint(model, ckpt_dir)
    return export_model_to_hf(model, cfg, out_dir, side_files_dir=meta_dir)
