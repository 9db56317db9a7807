"""Every place where megatron_xopd replaces, subclasses past a private method, or hooks into megatron-core.

Each entry names the megatron-core object, the module of ours that overrides it, why, and the parameter names
we rely on, as checked against megatron-core :data:`CHECKED_AGAINST`. :func:`check_overrides` (run by
``tests/test_runtime.py``) resolves every target and compares its parameters, so moving to a megatron-core
whose overridden internals changed fails loudly in one test instead of deep in a forward pass.
Add a line here with every new override.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

CHECKED_AGAINST = "0.16.1"


@dataclass(frozen=True)
class Override:
    target: str  # dotted path of the megatron-core object
    kind: str  # replaced | subclassed | hooked | attribute
    where: str  # our module
    why: str
    params: tuple[str, ...] | None = None  # parameter names we rely on (None: an attribute, checked to exist)


OVERRIDES: tuple[Override, ...] = (
    # The CPU layer (runtime/cpu_compat.py): megatron-core hard-codes CUDA on the path of a GPTModel step.
    Override("megatron.core.tensor_parallel.random.initialize_rng_tracker", "replaced", "runtime/cpu_compat.py",
             "installs the CPU RNG tracker", ("use_te_rng_tracker", "inference_rng_tracker", "use_cudagraphable_rng",
                                              "force_reset")),
    Override("megatron.core.tensor_parallel.random.CudaRNGStatesTracker.fork", "replaced", "runtime/cpu_compat.py",
             "CPURNGStatesTracker keeps named CPU generator states", ("self", "name")),
    Override("megatron.core.tensor_parallel.random.CudaRNGStatesTracker.add", "replaced", "runtime/cpu_compat.py",
             "CPURNGStatesTracker keeps named CPU generator states", ("self", "name", "seed")),
    Override("megatron.core.tensor_parallel.random._CUDA_RNG_STATE_TRACKER", "attribute", "runtime/cpu_compat.py",
             "the tracker the replaced initialize_rng_tracker sets"),
    Override("megatron.core.utils.GlobalMemoryBuffer.get_tensor", "replaced", "runtime/cpu_compat.py",
             "allocates on torch.cuda.current_device()", ("self", "tensor_shape", "dtype", "name", "mem_alloc_context")),
    Override("megatron.core.tensor_parallel.random._get_cuda_rng_state", "replaced", "runtime/cpu_compat.py",
             "activation recompute saves the CPU generator's state", ("device", "clone", "graph_safe")),
    Override("megatron.core.tensor_parallel.random._set_cuda_rng_state", "replaced", "runtime/cpu_compat.py",
             "activation recompute restores the CPU generator's state", ("new_state", "device", "graph_safe")),
    Override("megatron.core.transformer.utils.get_default_causal_mask", "replaced", "runtime/cpu_compat.py",
             "builds its mask on CUDA; recomputed attention runs outside the CPU device mode", ("sq",)),
    Override("megatron.core.fusions.fused_softmax.get_default_causal_mask", "replaced", "runtime/cpu_compat.py",
             "the name fused_softmax imported from transformer.utils", ("sq",)),
    # Norms of the local spec (models/norm.py): megatron's torch norm refuses sequence parallelism.
    Override("megatron.core.transformer.torch_norm.WrappedTorchNorm", "replaced", "models/norm.py",
             "RMSNorm whose weight is marked sequence_parallel (gradient summed over TP in finalize_model_grads)",
             ("config", "hidden_size", "eps", "persist_layer_norm", "zero_centered_gamma", "normalization")),
    # Checkpoints (trainer/checkpoint.py): resuming a distributed optimizer that never stepped.
    Override("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer._init_optimizer_states_with_dummy_values",
             "hooked", "trainer/checkpoint.py", "creates the Adam state a load expects", ("self",)),
    Override("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.load_state_dict", "hooked",
             "trainer/checkpoint.py", "torch Adam (no Apex/TE): the 'step' it loads is replaced per parameter by "
             "the saved Adam step", ("self", "state_dict")),
    Override("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states",
             "hooked", "trainer/checkpoint.py", "during a load only: torch Adam's 'step', which the fully_reshardable "
             "format does not save, is set aside (KeyError 'step'); reads model_param_group_index_map",
             ("self", "model_param", "tensors")),
    # MoE without Transformer Engine on CPU (runtime/cpu_compat.py).
    Override("megatron.core.transformer.moe.moe_utils.RouterGatingLinearFunction.forward", "hooked",
             "runtime/cpu_compat.py", "reads the TE-only global te_general_gemm; we bind it to None",
             ("ctx", "inp", "weight", "bias", "router_dtype")),
    Override("megatron.core.transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream",
             "attribute", "runtime/cpu_compat.py", "a class-wide torch.cuda.Stream made in __init__ when None"),
    Override("megatron.core.transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",
             "replaced", "runtime/cpu_compat.py", "device-to-host copies on a CUDA stream; a no-op on the host",
             ("self", "point", "tokens_per_expert")),
    Override("megatron.core.tensor_parallel.mappings._gather_along_first_dim", "replaced", "runtime/cpu_compat.py",
             "uneven output_split_sizes (expert-TP token gather): padded all-gather on gloo",
             ("input_", "group", "output_split_sizes", "use_global_buffer")),
    Override("megatron.core.tensor_parallel.mappings._reduce_scatter_along_first_dim", "replaced",
             "runtime/cpu_compat.py", "uneven input_split_sizes: all-reduce and keep this rank's block on gloo",
             ("input_", "group", "input_split_sizes", "use_global_buffer")),
    # Attention of the local spec (models/attention.py): SDPA in training without TE, fast CPU rollouts.
    Override("megatron.core.transformer.dot_product_attention.DotProductAttention.forward", "subclassed",
             "models/attention.py", "SDPA with GQA (causal or boolean mask) in training and inference; reads "
             "softmax_scale, softmax_offset, attention_dropout, attn_mask_type, scale_mask_softmax.window_size/scale",
             ("self", "query", "key", "value", "attention_mask", "attn_mask_type", "attention_bias",
              "packed_seq_params")),
    Override("megatron.core.transformer.dot_product_attention.DotProductAttention.__init__", "subclassed",
             "models/attention.py", "SDPAttention relies on the attributes __init__ sets from these arguments",
             ("self", "config", "layer_number", "attn_mask_type", "attention_type", "attention_dropout",
              "softmax_scale", "cp_comm_type", "pg_collection")),
    Override("megatron.core.transformer.attention.Attention._adjust_key_value_for_inference", "subclassed",
             "models/attention.py", "caches keys already rotated by RoPE (static batching), at per-row positions "
             "for left-padded rows",
             ("self", "inference_context", "query", "key", "value", "rotary_pos_emb", "rotary_pos_cos",
              "rotary_pos_sin", "rotary_pos_cos_sin", "sequence_len_offset", "inference_params")),
    Override("megatron.core.inference.contexts.StaticInferenceContext.__init__", "subclassed", "models/attention.py",
             "PaddedStaticContext: left-padded rows; keep_rows drops rows of key_value_memory_dict ([seq, batch, ...])",
             ("self", "max_batch_size", "max_sequence_length", "use_flashinfer_fused_rope")),
    # The rollout engine (rollout/engine.py): vocab-parallel logits and the student's audio through inference.
    Override("megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper.GPTInferenceWrapper._forward",
             "subclassed", "rollout/engine.py", "passes the student's audio_embeds", ("self", "inference_input")),
    Override("megatron.core.tensor_parallel.layers.ColumnParallelLinear.forward", "hooked", "rollout/engine.py",
             "a pre-hook sets runtime_gather_output=False: logits stay vocab-parallel",
             ("self", "input_", "weight", "runtime_gather_output")),
    # The fused-linear losses (models/head.py): the last stage returns hidden states, the loss applies the head.
    Override("megatron.core.tensor_parallel.layers.ColumnParallelLinear.forward", "replaced", "models/head.py",
             "an instance forward returns the output layer's input (sequence-gathered) instead of logits",
             ("self", "input_", "weight", "runtime_gather_output")),
    Override("megatron.core.models.gpt.gpt_model.GPTModel._postprocess", "hooked", "models/head.py",
             "relies on labels=None returning the output layer's output transposed to [b, s, ...]",
             ("self", "hidden_states", "input_ids", "position_ids", "labels", "rotary_pos_emb", "rotary_pos_cos",
              "rotary_pos_sin", "mtp_in_postprocess", "loss_mask", "decoder_input", "attention_mask",
              "inference_params", "packed_seq_params", "sequence_len_offset", "runtime_gather_output",
              "extra_block_kwargs", "inference_context")),
    Override("megatron.core.tensor_parallel.mappings.gather_from_sequence_parallel_region", "hooked",
             "models/head.py", "gathers the hidden states with a split (not reduce-scatter) backward",
             ("input_", "tensor_parallel_output_grad", "group", "output_split_sizes", "use_global_buffer")),
    Override("megatron.core.tensor_parallel.layers.ColumnParallelLinear._forward_impl", "replaced",
             "rollout/engine.py", "in rollouts an instance attribute runs the matmul without the autograd Function",
             ("self", "input", "weight", "args", "kwargs")),
    Override("megatron.core.tensor_parallel.layers.RowParallelLinear._forward_impl", "replaced",
             "rollout/engine.py", "in rollouts an instance attribute runs the matmul without the autograd Function",
             ("self", "input", "weight", "args", "kwargs")),
    Override("megatron.core.tensor_parallel.layers.linear_with_grad_accumulation_and_async_allreduce", "replaced",
             "rollout/engine.py", "the keywords the parallel linears pass to _forward_impl (the replacement takes "
             "input, weight, bias, sequence_parallel; forward = matmul(input, weight.t()) + bias)",
             ("input", "weight", "bias", "gradient_accumulation_fusion", "allreduce_dgrad", "sequence_parallel",
              "grad_output_buffer", "wgrad_deferral_limit", "async_grad_allreduce", "tp_group")),
    Override("megatron.core.inference.contexts.StaticInferenceContext.reset", "subclassed", "models/attention.py",
             "PaddedStaticContext also drops its per-forward positions and rotary tables", ("self",)),
    Override("megatron.core.inference.contexts.StaticInferenceContext.swap_key_value_dict", "hooked",
             "rollout/engine.py", "copies prefilled cache rows to the n samples of each prompt", ("self", "batch_idx")),
)


def _resolve(path: str) -> Any:
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def check_overrides() -> list[str]:
    """One line per override whose target is gone or whose parameters changed; empty when all match."""
    problems = []
    for override in OVERRIDES:
        try:
            obj = _resolve(override.target)
        except (ImportError, AttributeError) as err:
            problems.append(f"{override.target} ({override.where}): missing in this megatron-core ({err})")
            continue
        if override.params is None:
            continue
        params = tuple(inspect.signature(obj).parameters)
        if params != override.params:
            problems.append(f"{override.target} ({override.where}): parameters {params}, checked against "
                            f"megatron-core {CHECKED_AGAINST} as {override.params}")
    return problems
