"""Build megatron-core ``GPTModel``s (Llama / Qwen2 / Qwen3, dense or MoE) from :class:`GPTModelConfig`."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from ..ops.sharding import vocab_shard
from ..runtime.parallel import current_pipeline_split
from .attention import RotateOnceSelfAttention, SDPAttention
from .config import GPTModelConfig, ModelConfigError, RecomputeConfig
from .norm import RMSNorm


def transformer_engine_usable() -> bool:
    """TE is used only where it can run: importable and with CUDA."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def uses_transformer_engine(cfg: GPTModelConfig) -> bool:
    if cfg.transformer_impl == "local":
        return False
    if cfg.transformer_impl == "transformer_engine":
        if not transformer_engine_usable():
            raise ModelConfigError("model.transformer_impl: transformer_engine needs CUDA and transformer-engine installed")
        return True
    return transformer_engine_usable()


def to_transformer_config(
    cfg: GPTModelConfig, *, sequence_parallel: bool = False, recompute: RecomputeConfig | None = None
) -> TransformerConfig:
    """The megatron ``TransformerConfig`` for ``cfg`` under the current ``parallel_state`` layout."""
    if cfg.fp8 and not uses_transformer_engine(cfg):
        # megatron-core would accept it and the local spec would silently train in params_dtype
        raise ModelConfigError(f"model.fp8: {cfg.fp8!r} needs Transformer Engine (importable, with CUDA) and "
                               f"model.transformer_impl auto|transformer_engine (got {cfg.transformer_impl!r})")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    split = current_pipeline_split()  # the layout's uneven pipeline split, as the layout's TP and PP
    cfg.validate_parallel(tp, pp, ep, etp, split=split)
    if cfg.num_moe_experts and tp > 1 and not sequence_parallel:
        raise ModelConfigError(
            f"parallel.sequence_parallel: megatron-core's MoE layer needs sequence parallelism at "
            f"tensor_model_parallel_size {tp} (model.num_moe_experts={cfg.num_moe_experts})"
        )
    te = uses_transformer_engine(cfg)
    dtype = cfg.torch_dtype
    values = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        attention_softmax_in_fp32=True,
        # Fusions need apex/TE kernels; without TE (CPU) the unfused torch paths run.
        gradient_accumulation_fusion=False,
        apply_rope_fusion=te,
        bias_activation_fusion=te,
        masked_softmax_fusion=te,
        persist_layer_norm=te,
        bias_dropout_fusion=te,
        attention_backend=AttnBackend.auto if te else AttnBackend.unfused,
        use_cpu_initialization=not torch.cuda.is_available(),
        fp8=cfg.fp8,
        fp8_recipe=cfg.fp8_recipe,
        num_moe_experts=cfg.num_moe_experts,
        moe_router_topk=cfg.moe_router_topk,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
        moe_grouped_gemm=cfg.moe_grouped_gemm,
        moe_router_load_balancing_type=cfg.moe_router_load_balancing_type,
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_router_pre_softmax=cfg.moe_router_pre_softmax,
        **(recompute or RecomputeConfig()).transformer_kwargs(),
        **split,
    )
    if cfg.num_moe_experts:
        values.update(
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            moe_layer_freq=cfg.moe_layer_freq,
            moe_shared_expert_gate=cfg.moe_shared_expert_gate,
            moe_token_dispatcher_type=cfg.moe_token_dispatcher_type,
            moe_router_score_function="softmax",
            # HF computes router logits in the model dtype; megatron's default is the same (None).
            moe_permute_fusion=te,
            moe_router_fusion=te,
        )
    values.update(cfg.transformer_overrides)
    return TransformerConfig(**values)


def _localize(spec: ModuleSpec) -> ModuleSpec:
    """A local-spec layer with our norms (:class:`~megatron_xopd.models.norm.RMSNorm`: megatron's torch norm
    refuses sequence parallelism) and our attention (PyTorch SDPA in training and rollouts, no [b, h, s, s] scores;
    see :mod:`megatron_xopd.models.attention`)."""
    layer = spec.submodules
    layer.input_layernorm = RMSNorm
    if layer.pre_mlp_layernorm is not IdentityOp:
        layer.pre_mlp_layernorm = RMSNorm
    attention = layer.self_attention.submodules
    if attention.q_layernorm is not IdentityOp and attention.q_layernorm is not None:
        attention.q_layernorm = attention.k_layernorm = RMSNorm
    layer.self_attention.module = RotateOnceSelfAttention
    attention.core_attention = SDPAttention
    return spec


def layer_spec(cfg: GPTModelConfig) -> ModuleSpec:
    """A dense layer: the Transformer Engine spec on GPU when TE is importable, megatron's local (torch) spec
    otherwise."""
    common = dict(num_experts=None, moe_grouped_gemm=False, qk_layernorm=cfg.qk_layernorm)
    if uses_transformer_engine(cfg):
        return get_gpt_layer_with_transformer_engine_spec(fp8=cfg.fp8, **common)
    return _localize(get_gpt_layer_local_spec(normalization="RMSNorm", **common))


def block_spec(cfg: GPTModelConfig, config: TransformerConfig, vp_stage: int | None) -> ModuleSpec | TransformerBlockSubmodules:
    """This stage's decoder; the local spec's final norm is also our :class:`RMSNorm`.

    MoE models get megatron's decoder block spec (dense or MoE layers per ``moe_layer_freq``; sequential experts
    on the local spec, grouped GEMM only with TE).
    """
    te = uses_transformer_engine(cfg)
    if cfg.num_moe_experts:
        if cfg.moe_grouped_gemm and not te:
            raise ModelConfigError("model.moe_grouped_gemm needs Transformer Engine and CUDA (the CPU path runs sequential experts)")
        block = get_gpt_decoder_block_spec(config, use_transformer_engine=te, normalization="RMSNorm", vp_stage=vp_stage)
        if not te:
            block.layer_specs = [_localize(spec) for spec in block.layer_specs]
            block.layer_norm = RMSNorm
        return block
    spec = layer_spec(cfg)
    if te:
        return spec
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage), layer_norm=RMSNorm)


def build_gpt_model(
    cfg: GPTModelConfig,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    sequence_parallel: bool | None = None,
    recompute: RecomputeConfig | None = None,
    vp_stage: int | None = None,
) -> GPTModel:
    """Build this rank's part of the model (its TP shard of its PP stage) under ``parallel_state``.

    ``sequence_parallel=None`` turns it on where megatron-core requires it (an MoE model at TP > 1) and off
    elsewhere; ``GPTModel`` scatters and gathers the sequence itself, so callers see the same tensors.

    The output layer returns vocab-parallel logits (``parallel_output=True``): each TP rank holds the
    columns of its vocabulary shard, which is what the divergence ops consume.
    """
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("build_gpt_model: initialise megatron_xopd.runtime.initialize_model_parallel first")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if sequence_parallel is None:
        sequence_parallel = bool(cfg.num_moe_experts) and tp > 1
    config = to_transformer_config(cfg, sequence_parallel=sequence_parallel, recompute=recompute)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(cfg, config, vp_stage),
        vocab_size=cfg.padded_vocab(tp),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
        vp_stage=vp_stage,
    )
    return model


def vocab_shard_range(cfg: GPTModelConfig) -> tuple[int, int]:
    """The global vocabulary columns [start, end) this TP rank holds."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    shard = vocab_shard(cfg.padded_vocab(tp) // tp, None, None)
    return shard.offset, shard.offset + shard.local_size
