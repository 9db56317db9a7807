"""Hugging Face causal LMs (Llama, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE) <-> the canonical megatron-core state dict.

The canonical form (see :mod:`megatron_xopd.models.sharding`) holds megatron parameter names with global
layer numbers, TE-style fused norm names and the unpadded vocabulary. This module maps it to and from HF's
``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` names:

* ``q_proj``/``k_proj``/``v_proj`` (and Qwen2's biases) <-> ``linear_qkv`` in megatron's interleaved per-query-
  group layout ``[groups, (heads_per_group q heads, k, v), head_dim]``. Both sides rotate with the
  half-split (``rotate_half``) RoPE convention, so no row permutation is needed.
* ``gate_proj``/``up_proj`` <-> ``linear_fc1`` = ``cat([gate, up])`` (megatron's SwiGLU applies the
  activation to the first half).
* ``input_layernorm``/``post_attention_layernorm`` <-> ``linear_qkv.layer_norm_weight``/``linear_fc1.layer_norm_weight``;
  Qwen3's ``q_norm``/``k_norm`` <-> ``q_layernorm``/``k_layernorm``.
* MoE layers: ``mlp.gate`` <-> ``mlp.router``; ``mlp.experts.{e}.gate_proj/up_proj/down_proj`` <->
  ``mlp.experts.local_experts.{e}.linear_fc1/linear_fc2`` (global expert index); ``post_attention_layernorm``
  <-> ``pre_mlp_layernorm``; Qwen2-MoE's ``shared_expert`` <-> ``shared_experts`` and ``shared_expert_gate``
  <-> ``shared_experts.gate_weight``. On disk HF keeps one tensor per expert (transformers fuses them in memory).

Why our own mapping: NVIDIA's Megatron-Bridge does this for many architectures and is used by
:mod:`megatron_xopd.convert.checkpoint` when it is installed and supports the model, but it is not installable
everywhere (not on this project's CPU test machines), its mapping registry targets the Transformer Engine
layer spec (our CPU models use megatron's local spec, whose parameter names differ), and it does not know
NeMo SALM checkpoints. This mapping covers the three families of :class:`GPTModelConfig` exactly and is the
fallback everywhere else; the tests check it bit for bit and against transformers' logits.

Tensors are read lazily (:class:`HFCheckpoint` opens the safetensors shards with ``safe_open``), so a rank
reads only the tensors of the parameters it holds.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.config import GPTModelConfig, ModelConfigError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
MOE_ARCHITECTURES = {"Qwen2MoeForCausalLM": "qwen2", "Qwen3MoeForCausalLM": "qwen3"}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
_FAMILY_ARCH = {family: arch for arch, family in ARCHITECTURES.items()}
_FAMILY_MOE_ARCH = {family: arch for arch, family in MOE_ARCHITECTURES.items()}
_EXPERT_KEY = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")
# Files of an HF model directory besides the weights that belong with a converted checkpoint.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
GENERATION_CONFIG = "generation_config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# HF tensors that carry no weights of the model (recomputed buffers of old checkpoints).
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ModelConfigError):
    """A checkpoint that cannot be converted; the message names the file, field or tensor."""


# --------------------------------------------------------------------------------------------- configs


def hf_family(config: Mapping[str, Any]) -> str:
    """``llama`` / ``qwen2`` / ``qwen3`` for a supported HF config dict; a clear error naming the architecture otherwise."""
    archs = list(config.get("architectures") or [])
    known = {**ARCHITECTURES, **MOE_ARCHITECTURES}
    for arch in archs:
        if arch in known:
            return known[arch]
    model_type = config.get("model_type")
    if not archs and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    name = archs[0] if archs else f"model_type={model_type!r}"
    raise ConversionError(
        f"unsupported architecture {name!r} (config.json architectures={archs}, model_type={model_type!r}); "
        f"supported: {sorted(known)}"
    )


def hf_is_moe(config: Mapping[str, Any]) -> bool:
    archs = set(config.get("architectures") or [])
    return bool(archs & MOE_ARCHITECTURES.keys()) or config.get("model_type") in ("qwen2_moe", "qwen3_moe")


def _num_experts(config: Mapping[str, Any]) -> int:
    """``num_experts`` (Qwen's published configs) or ``num_local_experts`` (what transformers 5 saves)."""
    value = config.get("num_experts", config.get("num_local_experts"))
    if not value:
        raise ConversionError("config.json num_experts: an MoE architecture needs a positive expert count")
    return int(value)


def _moe_fields(config: Mapping[str, Any], family: str) -> dict[str, Any]:
    """The MoE fields of :class:`GPTModelConfig` from a Qwen2-MoE / Qwen3-MoE ``config.json``."""
    experts = _num_experts(config)
    layers = int(config["num_hidden_layers"])
    step = int(config.get("decoder_sparse_step", 1) or 1)
    dense = set(config.get("mlp_only_layers") or [])
    pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
    values: dict[str, Any] = dict(
        num_moe_experts=experts,
        moe_router_topk=int(config["num_experts_per_tok"]),
        moe_ffn_hidden_size=int(config["moe_intermediate_size"]),
        # HF: softmax over all experts, top-k, then renormalise iff norm_topk_prob. megatron without pre-softmax
        # takes the top-k logits and softmaxes them, which equals the renormalised top-k probabilities.
        moe_router_pre_softmax=not bool(config.get("norm_topk_prob", False)),
        moe_aux_loss_coeff=float(config.get("router_aux_loss_coef", 0.0)),
        moe_layer_freq=1 if all(pattern) else pattern,
    )
    if family == "qwen2":
        shared = config.get("shared_expert_intermediate_size")
        if not shared:
            raise ConversionError("config.json shared_expert_intermediate_size: Qwen2-MoE needs a shared expert")
        values.update(moe_shared_expert_intermediate_size=int(shared), moe_shared_expert_gate=True)
    return values


def check_hf_expert_count(names: Iterable[str], config: Mapping[str, Any]) -> None:
    """A checkpoint whose expert tensors do not match ``config.json num_experts`` fails here, naming the field."""
    found = {int(m.group(1)) for n in names if (m := _EXPERT_KEY.match(n))}
    if not found:
        return
    expected = _num_experts(config)
    if found != set(range(expected)):
        raise ConversionError(
            f"config.json num_experts={expected}, but the checkpoint's tensors hold {len(found)} experts "
            f"(indices {min(found)}..{max(found)})"
        )


def _rope_theta(config: Mapping[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConversionError(f"config.json rope_parameters.rope_type={rope_type!r} is not supported (only 'default' RoPE)")
    if float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ConversionError("config.json partial_rotary_factor != 1 is not supported")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def hf_config_to_model_config(
    config: Mapping[str, Any], *, params_dtype: str | None = None, text_vocab_size: int | None = None, **overrides: Any
) -> GPTModelConfig:
    """The :class:`GPTModelConfig` of an HF ``config.json`` dict (Llama, Qwen2 or Qwen3).

    ``params_dtype`` defaults to the checkpoint's ``dtype`` (float32 when absent or unknown);
    ``text_vocab_size`` is the tokenizer's size when known (the embedding may have padding rows beyond it).
    Features the megatron model here cannot express (other RoPE types, sliding windows, biases outside Q/K/V)
    raise :class:`ConversionError` naming the field.
    """
    family = hf_family(config)
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"config.json hidden_act={act!r} is not supported (SwiGLU needs 'silu')")
    if config.get("mlp_bias"):
        raise ConversionError("config.json mlp_bias=true is not supported")
    moe = hf_is_moe(config)
    if family in ("llama", "qwen3") and config.get("attention_bias"):
        raise ConversionError(f"config.json attention_bias=true is not supported for {family} (bias on o_proj)")
    if config.get("use_sliding_window"):
        raise ConversionError("config.json use_sliding_window=true is not supported")
    dtype = params_dtype or config.get("dtype") or config.get("torch_dtype") or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        dtype = "float32"
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim")
    if text_vocab_size is not None:
        text_vocab_size = min(text_vocab_size, config["vocab_size"])
    values = dict(
        family=family,
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        kv_channels=int(head_dim) if head_dim else None,
        vocab_size=config["vocab_size"],
        text_vocab_size=text_vocab_size,
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        rotary_base=_rope_theta(config),
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        params_dtype=dtype,
    )
    if moe:
        values.update(_moe_fields(config, family))
        if family == "qwen2":
            values["add_qkv_bias"] = bool(config.get("qkv_bias", True))
    values.update(overrides)
    return GPTModelConfig(**values)


def model_config_to_hf_config(cfg: GPTModelConfig, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The HF ``config.json`` dict of ``cfg``; fields of ``base`` (the source checkpoint's config: token ids,
    ``initializer_range``...) are kept unless ``cfg`` determines them."""
    if cfg.num_moe_experts and cfg.family not in _FAMILY_MOE_ARCH:
        raise ConversionError(f"model.num_moe_experts: no HF MoE architecture for model.family={cfg.family!r}")
    if cfg.num_moe_experts and (cfg.family == "qwen2") != bool(cfg.moe_shared_expert_gate):
        raise ConversionError(
            f"model.moe_shared_expert_gate={cfg.moe_shared_expert_gate}: {_FAMILY_MOE_ARCH[cfg.family]} "
            f"{'needs' if cfg.family == 'qwen2' else 'has no'} a gated shared expert"
        )
    if cfg.family == "llama" and cfg.add_qkv_bias:
        raise ConversionError("model.add_qkv_bias: LlamaForCausalLM cannot hold a Q/K/V bias without an o_proj bias")
    if ((cfg.family == "qwen2") != bool(cfg.add_qkv_bias) and not cfg.num_moe_experts) or (
        (cfg.family == "qwen3") != bool(cfg.qk_layernorm)
    ):
        raise ConversionError(
            f"model.add_qkv_bias={cfg.add_qkv_bias} / model.qk_layernorm={cfg.qk_layernorm} do not match the HF "
            f"{_FAMILY_ARCH[cfg.family]} architecture"
        )
    out = dict(base or {})
    out.pop("rope_scaling", None)
    out.update(
        architectures=[_FAMILY_ARCH[cfg.family]],
        model_type=cfg.family,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base},
        dtype=cfg.params_dtype,
    )
    if "rope_theta" in out:  # an older-style base config: keep its top-level field consistent
        out["rope_theta"] = cfg.rotary_base
    if cfg.kv_channels is not None or "head_dim" in out:
        out["head_dim"] = cfg.head_dim
    if cfg.family in ("llama", "qwen3"):
        out["attention_bias"] = False
    if cfg.family == "llama":
        out["mlp_bias"] = False
    if cfg.num_moe_experts:
        out.update(
            architectures=[_FAMILY_MOE_ARCH[cfg.family]],
            model_type=f"{cfg.family}_moe",
            num_experts=cfg.num_moe_experts,
            **({"num_local_experts": cfg.num_moe_experts} if "num_local_experts" in out else {}),
            num_experts_per_tok=cfg.moe_router_topk,
            moe_intermediate_size=cfg.expert_ffn_hidden_size,
            norm_topk_prob=not cfg.moe_router_pre_softmax,
            router_aux_loss_coef=cfg.moe_aux_loss_coeff,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)],
        )
        if cfg.family == "qwen2":
            out.update(shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
                       qkv_bias=bool(cfg.add_qkv_bias))
    return out


# --------------------------------------------------------------------------------------------- tensors


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: GPTModelConfig) -> torch.Tensor:
    groups, hn = cfg.num_query_groups, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    rest = q.shape[1:]
    parts = (q.reshape(groups, per_group * hn, *rest), k.reshape(groups, hn, *rest), v.reshape(groups, hn, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def _split_qkv(qkv: torch.Tensor, cfg: GPTModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, hn = cfg.num_query_groups, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, (per_group + 2) * hn, *rest).split([per_group * hn, hn, hn], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))  # type: ignore[return-value]


def _entries(cfg: GPTModelConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """(canonical name, HF names, kind) for every weight; kind is ``copy``, ``qkv`` or ``fc1``."""
    entries = [
        ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "copy"),
        ("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
    ]
    if not cfg.tie_word_embeddings:
        entries.append(("output_layer.weight", ("lm_head.weight",), "copy"))
    for i in range(cfg.num_layers):
        c, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = h + "self_attn."
        entries += [
            (c + "self_attention.linear_qkv.layer_norm_weight", (h + "input_layernorm.weight",), "copy"),
            (c + "self_attention.linear_qkv.weight", tuple(f"{attn}{p}_proj.weight" for p in "qkv"), "qkv"),
            (c + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), "copy"),
        ]
        if cfg.is_moe_layer(i):
            entries += _moe_entries(cfg, c, h)
        else:
            entries += [
                (c + "mlp.linear_fc1.layer_norm_weight", (h + "post_attention_layernorm.weight",), "copy"),
                *_mlp_entries(c + "mlp.", h + "mlp."),
            ]
        if cfg.add_qkv_bias:
            entries.append((c + "self_attention.linear_qkv.bias", tuple(f"{attn}{p}_proj.bias" for p in "qkv"), "qkv"))
        if cfg.qk_layernorm:
            entries += [
                (c + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",), "copy"),
                (c + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",), "copy"),
            ]
    return entries


def _mlp_entries(c: str, h: str) -> list[tuple[str, tuple[str, ...], str]]:
    """A SwiGLU MLP: megatron ``{c}linear_fc1/linear_fc2`` <-> HF ``{h}gate_proj/up_proj/down_proj``."""
    return [
        (c + "linear_fc1.weight", (h + "gate_proj.weight", h + "up_proj.weight"), "fc1"),
        (c + "linear_fc2.weight", (h + "down_proj.weight",), "copy"),
    ]


def _moe_entries(cfg: GPTModelConfig, c: str, h: str) -> list[tuple[str, tuple[str, ...], str]]:
    entries = [
        (c + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), "copy"),
        (c + "mlp.router.weight", (h + "mlp.gate.weight",), "copy"),
    ]
    for e in range(cfg.num_moe_experts or 0):
        entries += _mlp_entries(f"{c}mlp.experts.local_experts.{e}.", f"{h}mlp.experts.{e}.")
    if cfg.moe_shared_expert_intermediate_size:
        entries += _mlp_entries(c + "mlp.shared_experts.", h + "mlp.shared_expert.")
        if cfg.moe_shared_expert_gate:
            entries.append((c + "mlp.shared_experts.gate_weight", (h + "mlp.shared_expert_gate.weight",), "copy"))
    return entries


def canonical_keys(cfg: GPTModelConfig) -> list[str]:
    return [name for name, _, _ in _entries(cfg)]


def hf_keys(cfg: GPTModelConfig) -> list[str]:
    """The HF tensor names a checkpoint of ``cfg`` must hold."""
    return [src for _, sources, _ in _entries(cfg) for src in sources]


def hf_to_canonical(
    hf_state_dict: Mapping[str, torch.Tensor], cfg: GPTModelConfig, *, keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """HF-named tensors -> canonical ones. Only ``keys`` (canonical names) are built when given, and only
    the HF tensors they need are read from ``hf_state_dict`` (which may be a lazy :class:`HFCheckpoint`)."""
    wanted = None if keys is None else set(keys)
    out: dict[str, torch.Tensor] = {}
    for name, sources, kind in _entries(cfg):
        if wanted is not None and name not in wanted:
            continue
        missing = [src for src in sources if src not in hf_state_dict]
        if missing:
            raise ConversionError(f"HF checkpoint lacks tensor(s) {missing} (needed for {name})")
        tensors = [hf_state_dict[src] for src in sources]
        if kind == "qkv":
            out[name] = _fuse_qkv(*tensors, cfg)
        elif kind == "fc1":
            out[name] = torch.cat(tensors, dim=0)
        else:
            out[name] = tensors[0]
    if wanted is not None and wanted - out.keys():
        raise ConversionError(f"no HF mapping for canonical parameter(s) {sorted(wanted - out.keys())[:5]}")
    return out


def _hf_parts(tensor: torch.Tensor, sources: tuple[str, ...], kind: str, cfg: GPTModelConfig
              ) -> list[tuple[str, torch.Tensor]]:
    if kind == "qkv":
        parts = _split_qkv(tensor, cfg)
    elif kind == "fc1":
        parts = tuple(t.contiguous() for t in tensor.chunk(2, dim=0))
    else:
        parts = (tensor.contiguous(),)
    return list(zip(sources, parts))


def canonical_to_hf(canonical: Mapping[str, torch.Tensor], cfg: GPTModelConfig) -> dict[str, torch.Tensor]:
    """Canonical tensors -> HF-named ones (tied models have no ``lm_head.weight``, as transformers saves them)."""
    out: dict[str, torch.Tensor] = {}
    for name, sources, kind in _entries(cfg):
        if name not in canonical:
            raise ConversionError(f"canonical state dict lacks {name}")
        out.update(_hf_parts(canonical[name], sources, kind, cfg))
    return out


class CanonicalToHF:
    """One canonical tensor at a time -> its HF-named tensors (what :func:`canonical_to_hf` does for a whole dict),
    for exports that stream."""

    def __init__(self, cfg: GPTModelConfig) -> None:
        self.cfg = cfg
        self.table = {name: (sources, kind) for name, sources, kind in _entries(cfg)}

    def check(self, names: Iterable[str]) -> None:
        """Raise naming the difference when ``names`` are not exactly the model's canonical tensors."""
        names = set(names)
        missing, unknown = sorted(self.table.keys() - names), sorted(names - self.table.keys())
        if missing or unknown:
            raise ConversionError(f"the model's tensors do not match the {self.cfg.family} mapping: missing "
                                  f"{missing[:5]}, unknown {unknown[:5]}")

    def __call__(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        sources, kind = self.table[name]
        return _hf_parts(tensor, sources, kind, self.cfg)

    def plan(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The HF names, shapes and dtypes ``name`` becomes (computed on the meta device: no memory)."""
        return [(n, tuple(t.shape), t.dtype) for n, t in self(name, torch.empty(shape, dtype=dtype, device="meta"))]


def check_hf_keys(names: Iterable[str], cfg: GPTModelConfig) -> None:
    """Raise naming the tensors when a checkpoint's names are not exactly those of ``cfg``."""
    names = set(names)
    expected = set(hf_keys(cfg))
    missing = sorted(expected - names)
    unexpected = sorted(
        n for n in names - expected
        if not n.endswith(_IGNORED_HF_SUFFIXES) and not (n == "lm_head.weight" and cfg.tie_word_embeddings)
    )
    if missing:
        raise ConversionError(f"HF checkpoint lacks {len(missing)} tensor(s) of the {cfg.family} model, e.g. {missing[:5]}")
    if unexpected:
        raise ConversionError(
            f"HF checkpoint has {len(unexpected)} tensor(s) the {cfg.family} mapping does not know, e.g. {unexpected[:5]}"
        )


# --------------------------------------------------------------------------------------------- files


class LazyTensors(Mapping):
    """A read-only mapping name -> tensor whose values are produced on access (e.g. read from disk)."""

    def __init__(self, loaders: dict[str, Callable[[], torch.Tensor]]) -> None:
        self._loaders = loaders

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._loaders[key]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def __contains__(self, key: object) -> bool:
        return key in self._loaders


class SafetensorsFiles:
    """Open-on-demand ``safe_open`` handles of the shards of one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._handles: dict[str, Any] = {}

    def get(self, filename: str, key: str) -> torch.Tensor:
        if filename not in self._handles:
            self._handles[filename] = safe_open(str(self.root / filename), framework="pt", device="cpu")
        return self._handles[filename].get_tensor(key)

    def keys(self, filename: str) -> list[str]:
        with safe_open(str(self.root / filename), framework="pt", device="cpu") as handle:
            return list(handle.keys())


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None


class HFCheckpoint(LazyTensors):
    """The weights of an HF model directory (``model.safetensors`` or shards + ``model.safetensors.index.json``).

    Opening checks that every shard the index names exists (the error names the missing files); tensors are
    read on access, from the shard that holds them.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"HF model directory {self.path} does not exist")
        self.config = read_json(self.path / "config.json")
        files = SafetensorsFiles(self.path)
        index = self.path / SAFETENSORS_INDEX
        if index.is_file():
            weight_map: dict[str, str] = read_json(index)["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{self.path}: shard file(s) {missing} named in {SAFETENSORS_INDEX} are missing")
        elif (self.path / SAFETENSORS_SINGLE).is_file():
            weight_map = {key: SAFETENSORS_SINGLE for key in files.keys(SAFETENSORS_SINGLE)}
        else:
            others = sorted(p.name for p in self.path.glob("*.bin"))
            hint = f" (found {others}: convert PyTorch .bin weights to safetensors first)" if others else ""
            raise FileNotFoundError(f"{self.path}: neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX}{hint}")
        self.weight_map = weight_map
        super().__init__({key: (lambda f=f, k=key: files.get(f, k)) for key, f in weight_map.items()})


def copy_tokenizer_files(src: str | Path, dst: str | Path, *, generation_config: bool = True) -> list[str]:
    """Copy the tokenizer files (and ``generation_config.json``) that exist in ``src`` into ``dst``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    names = TOKENIZER_FILES + ((GENERATION_CONFIG,) if generation_config else ())
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
SAFETENSORS_DTYPES = {v: k for k, v in _ST_DTYPES.items()}  # safetensors' dtype codes -> torch dtypes


class StreamingSafetensorsWriter:
    """Write HF weights tensor by tensor: safetensors shard files (and an index beyond one file) whose headers are
    computed from the planned names, shapes and dtypes, so no more than the tensor being written is in memory.

    Why: ``safetensors.torch.save_file`` needs a whole shard file's tensors at once (5 GiB a file by default).
    The files are those :func:`save_hf_checkpoint` writes (same names, same sharding rule, same ``format: pt``
    metadata); tensors must come in the planned order.
    """

    def __init__(self, out_dir: str | Path, planned: list[tuple[str, tuple[int, ...], torch.dtype]], *,
                 max_shard_bytes: int = 5 * 2**30) -> None:
        self.out = Path(out_dir)
        names = [name for name, _, _ in planned]
        if len(set(names)) != len(names):  # a header holds each name once: the file would not load
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ConversionError(f"{self.out}: tensor(s) planned twice: {', '.join(twice[:3])}")
        self.out.mkdir(parents=True, exist_ok=True)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in planned:
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        count = len(shards)
        self.files = [SAFETENSORS_SINGLE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors"
                                                              for i in range(1, count + 1)]
        self.shards = shards
        self.total = sum(t[3] for shard in shards for t in shard)
        self.order = [(name, shape, dtype, i) for i, shard in enumerate(shards) for name, shape, dtype, _ in shard]
        self.position = 0
        self.handle = None
        self.open_index = -1

    def _open(self, index: int) -> None:
        if self.handle is not None:
            self.handle.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, nbytes in self.shards[index]:
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.handle = open(self.out / self.files[index], "wb")
        self.handle.write(len(text).to_bytes(8, "little") + text)
        self.open_index = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.position >= len(self.order):
            raise ConversionError(f"{self.out}: {name} is beyond the planned tensors")
        expected, shape, dtype, index = self.order[self.position]
        if (name, tuple(tensor.shape), tensor.dtype) != (expected, shape, dtype):
            raise ConversionError(f"{self.out}: got {name} {tuple(tensor.shape)} {tensor.dtype}, planned {expected} "
                                  f"{shape} {dtype}")
        if index != self.open_index:
            self._open(index)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self.handle.write(memoryview(data.view(torch.uint8).numpy()))
        self.position += 1

    def close(self) -> Path:
        """Finish the last file and write the index (several files); every planned tensor must have come."""
        if self.position != len(self.order):
            raise ConversionError(f"{self.out}: {len(self.order) - self.position} planned tensor(s) never written, "
                                  f"e.g. {self.order[self.position][0]}")
        if self.open_index < 0 and self.order == []:
            self._open(0)
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if len(self.files) > 1:
            weight_map = {name: self.files[i] for name, _, _, i in self.order}
            (self.out / SAFETENSORS_INDEX).write_text(
                json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2))
        return self.out


def read_safetensors_header(path: str | Path) -> tuple[int, dict[str, Any]]:
    """(where the data starts, the header's tensor entries) of a safetensors file, reading only its header."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


class SafetensorsPatcher:
    """A byte copy of a safetensors file in which named tensors are then overwritten one at a time, in place.

    Why: an export that keeps an original checkpoint's files (names, order, every other tensor) replaces the
    trained tensors without loading a whole file; each must have the original's shape, and is cast to its dtype.
    """

    def __init__(self, src: str | Path, dst: str | Path) -> None:
        shutil.copyfile(src, dst)
        self.path = Path(dst)
        self.start, self.entries = read_safetensors_header(dst)
        self.handle = open(dst, "r+b")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        entry = self.entries.get(name)
        if entry is None:
            raise ConversionError(f"{self.path}: the original has no tensor {name}")
        if list(tensor.shape) != entry["shape"]:
            raise ConversionError(f"{self.path}: {name}: the student's shape {tuple(tensor.shape)} differs from the "
                                  f"original {tuple(entry['shape'])}")
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ConversionError(f"{self.path}: {name} is stored as {entry['dtype']}, which the export does not "
                                  f"write (one of {', '.join(sorted(SAFETENSORS_DTYPES))})")
        data = tensor.detach().to("cpu", SAFETENSORS_DTYPES[entry["dtype"]]).contiguous().reshape(-1)
        self.handle.seek(self.start + entry["data_offsets"][0])
        if data.numel():
            self.handle.write(memoryview(data.view(torch.uint8).numpy()))

    def close(self) -> None:
        self.handle.close()


def save_hf_checkpoint(
    out_dir: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``config.json`` and the weights: one ``model.safetensors``, or shards plus an index beyond
    ``max_shard_bytes`` (what ``from_pretrained`` reads)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, str(out / SAFETENSORS_SINGLE), metadata={"format": "pt"})
        return out
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out
