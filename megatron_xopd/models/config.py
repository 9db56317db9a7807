"""Typed model configs for the Llama, Qwen2 and Qwen3 families (dense and MoE), mapped onto megatron-core's
``TransformerConfig``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..runtime.parallel import current_pipeline_split, split_problems

FAMILIES = ("llama", "qwen2", "qwen3")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelConfigError(ValueError):
    """A model config that cannot be built; the message names the field."""


@dataclass
class RecomputeConfig:
    """Activation recompute of the trained model (``trainer.recompute_*``), megatron's ``TransformerConfig`` fields.

    ``selective`` recomputes the core attention (megatron's default ``recompute_modules``); ``full`` recomputes
    whole layers, ``num_layers`` per chunk (``uniform``) or the first ``num_layers`` of each stage (``block``).
    """

    granularity: str | None = None  # None | selective | full
    method: str | None = None  # full only: uniform (default) | block
    num_layers: int | None = None  # full only: default 1

    def __post_init__(self) -> None:
        if self.granularity not in (None, "selective", "full"):
            raise ModelConfigError(f"trainer.recompute_granularity: {self.granularity!r} is not null|selective|full")
        if self.granularity == "full":
            self.method = self.method or "uniform"
            self.num_layers = self.num_layers or 1
            if self.method not in ("uniform", "block"):
                raise ModelConfigError(f"trainer.recompute_method: {self.method!r} is not uniform|block")
        elif self.method is not None or self.num_layers is not None:
            raise ModelConfigError("trainer.recompute_method and trainer.recompute_num_layers apply only to "
                                   "trainer.recompute_granularity=full")

    def transformer_kwargs(self) -> dict[str, Any]:
        return dict(recompute_granularity=self.granularity, recompute_method=self.method,
                    recompute_num_layers=self.num_layers)


@dataclass
class GPTModelConfig:
    """A decoder-only LM: RMSNorm, SwiGLU, RoPE, grouped-query attention.

    ``family`` sets the defaults that differ between families: Qwen2 has a bias on Q/K/V, Qwen3 has
    QK-norm. With ``num_moe_experts`` set the model is a mixture of experts (Qwen3-MoE, Qwen2-MoE; see
    docs/moe.md): ``moe_layer_freq`` says which layers are MoE (1 = all, or a 0/1 list per layer, megatron's
    convention), the others are dense SwiGLU MLPs of ``ffn_hidden_size``. ``moe_router_pre_softmax`` is HF's
    ``not norm_topk_prob``: False = top-k over logits then softmax over the k (the same as renormalised top-k
    probabilities), True = softmax over all experts then top-k, not renormalised. ``vocab_size`` is the number of embedding rows of the checkpoint (HF ``vocab_size``);
    ``text_vocab_size`` is the number of ids the tokenizer can emit (defaults to ``vocab_size``), and
    columns beyond it are padding that no loss or sampler may use. The embedding is padded to
    ``padded_vocab_size`` (or to a multiple of ``make_vocab_size_divisible_by`` x TP).
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int
    family: str = "llama"
    num_query_groups: int | None = None
    kv_channels: int | None = None
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    add_qkv_bias: bool | None = None  # None: the family default
    qk_layernorm: bool | None = None  # None: the family default
    tie_word_embeddings: bool = False
    text_vocab_size: int | None = None
    padded_vocab_size: int | None = None
    make_vocab_size_divisible_by: int = 128
    params_dtype: str = "float32"
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    transformer_impl: str = "auto"  # auto | local | transformer_engine
    # FP8 (Transformer Engine only: e4m3 | hybrid) and MoE: passed to TransformerConfig as given.
    fp8: str | None = None
    fp8_recipe: str = "delayed"
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_grouped_gemm: bool = False
    moe_router_load_balancing_type: str = "aux_loss"
    moe_aux_loss_coeff: float = 0.0
    moe_router_pre_softmax: bool = False
    moe_layer_freq: int | list[int] = 1
    moe_shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ gate) scales the shared expert
    moe_token_dispatcher_type: str = "alltoall"  # alltoall (runs on gloo) | allgather | flex (GPU only)
    # Any other TransformerConfig field, verbatim.
    transformer_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ModelConfigError(f"model.family: unsupported architecture {self.family!r}; expected one of {FAMILIES}")
        if self.params_dtype not in _DTYPES:
            raise ModelConfigError(f"model.params_dtype: {self.params_dtype!r} is not one of {tuple(_DTYPES)}")
        if self.add_qkv_bias is None:
            self.add_qkv_bias = self.family == "qwen2"
        if self.qk_layernorm is None:
            self.qk_layernorm = self.family == "qwen3"
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise ModelConfigError(
                f"model.num_query_groups ({self.num_query_groups}) must divide "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        if self.text_vocab_size is None:
            self.text_vocab_size = self.vocab_size
        if self.text_vocab_size > self.vocab_size:
            raise ModelConfigError(
                f"model.text_vocab_size ({self.text_vocab_size}) exceeds model.vocab_size ({self.vocab_size})"
            )
        self._validate_moe()
        if self.fp8 not in (None, "e4m3", "hybrid"):
            raise ModelConfigError(f"model.fp8: {self.fp8!r} is not null|e4m3|hybrid")
        if self.transformer_impl not in ("auto", "local", "transformer_engine"):
            raise ModelConfigError(f"model.transformer_impl: {self.transformer_impl!r} is not auto|local|transformer_engine")

    def _validate_moe(self) -> None:
        if not self.num_moe_experts:
            return
        if not 1 <= self.moe_router_topk <= self.num_moe_experts:
            raise ModelConfigError(
                f"model.moe_router_topk ({self.moe_router_topk}) must be in [1, model.num_moe_experts "
                f"({self.num_moe_experts})]"
            )
        if isinstance(self.moe_layer_freq, list):
            if len(self.moe_layer_freq) != self.num_layers or set(self.moe_layer_freq) - {0, 1}:
                raise ModelConfigError(
                    f"model.moe_layer_freq: a list must hold one 0/1 per layer ({self.num_layers}), "
                    f"got {self.moe_layer_freq}"
                )
        elif self.moe_layer_freq < 1:
            raise ModelConfigError(f"model.moe_layer_freq ({self.moe_layer_freq}) must be >= 1")
        if self.moe_token_dispatcher_type not in ("alltoall", "allgather", "flex"):
            raise ModelConfigError(
                f"model.moe_token_dispatcher_type: {self.moe_token_dispatcher_type!r} is not alltoall|allgather|flex"
            )
        if self.moe_shared_expert_gate and not self.moe_shared_expert_intermediate_size:
            raise ModelConfigError("model.moe_shared_expert_gate needs model.moe_shared_expert_intermediate_size")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether the 0-based global ``layer`` has an MoE MLP (megatron's ``moe_layer_freq`` semantics)."""
        if not self.num_moe_experts:
            return False
        if isinstance(self.moe_layer_freq, list):
            return bool(self.moe_layer_freq[layer])
        return layer % self.moe_layer_freq == 0

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.params_dtype]

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab(self, tensor_parallel_size: int) -> int:
        """Embedding rows after padding; a multiple of the TP size so every rank holds an equal shard."""
        if self.padded_vocab_size is not None:
            if self.padded_vocab_size < self.vocab_size or self.padded_vocab_size % tensor_parallel_size:
                raise ModelConfigError(
                    f"model.padded_vocab_size ({self.padded_vocab_size}) must be >= model.vocab_size "
                    f"({self.vocab_size}) and divisible by tensor_model_parallel_size ({tensor_parallel_size})"
                )
            return self.padded_vocab_size
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def validate_parallel(
        self,
        tensor_parallel_size: int,
        pipeline_parallel_size: int,
        expert_parallel_size: int = 1,
        expert_tensor_parallel_size: int | None = None,
        split: dict[str, Any] | None = None,
    ) -> None:
        """Raise a one-line error naming the field when this model cannot be split as asked (the first of
        :func:`~megatron_xopd.runtime.parallel.split_problems`, which owns the rules); ``split`` defaults to the
        pipeline split of the current layout (:func:`~megatron_xopd.runtime.parallel.current_pipeline_split`)."""
        problems = split_problems(self, tensor_parallel_size, pipeline_parallel_size, expert_parallel_size,
                                  expert_tensor_parallel_size,
                                  split=current_pipeline_split() if split is None else split)
        if problems:
            raise ModelConfigError(problems[0])

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "model") -> "GPTModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelConfigError(f"{where}: unknown field(s) {unknown}")
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in values]
        if missing:
            raise ModelConfigError(f"{where}: missing field(s) {missing}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else yaml.safe_dump(self.to_dict())
        path.write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> "GPTModelConfig":
        path = Path(path)
        values = yaml.safe_load(path.read_text())
        if not isinstance(values, dict):
            raise ModelConfigError(f"{path}: expected a mapping of model fields")
        return cls.from_dict(values, where=str(path))
