"""Memory plan of an X-OPD run: bytes per rank and per phase (rollout, teacher scoring, training), from shapes alone.

Why: whether a recipe fits its GPUs should be known before a 64-GPU job starts. Every line is a closed formula of
the model config (:class:`GPTModelConfig`) and the layout (:class:`ParallelConfig`), written out in
``docs/scaling.md``. Parameter counts are exact (a test compares them with built megatron-core models); the
activation, KV-cache and logits lines are models of what megatron-core and this package allocate, to be checked
against ``torch.cuda.max_memory_reserved`` and ``max_memory_allocated`` (``benchmarks/memory_plan_check.py``).

Notation: h hidden, L layers, a query heads, g query groups (KV heads), d head dim, F dense FFN, E experts,
k router top-k, Fm expert FFN, Fs shared-expert FFN, V padded vocabulary; t TP, p PP, v virtual PP, c CP,
e EP, et expert TP; DP = world / (t p c), expert DP = world / (et e p).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

from ..ops.divergence import LINEAR_CHUNK_ELEMENTS, LOGITS_CHUNK_ELEMENTS
from ..runtime.parallel import SPLIT_KEYS, LayoutError, ParallelConfig, stage_layer_numbers
from .config import GPTModelConfig
from .speech import common_padded_vocab

GiB = 1024**3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4


# ------------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """A :class:`ParallelConfig` on ``world_size`` ranks, with the derived data-parallel sizes."""

    parallel: ParallelConfig
    world_size: int

    @property
    def tp(self) -> int:
        return self.parallel.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.parallel.pipeline_model_parallel_size

    @property
    def cp(self) -> int:
        return self.parallel.context_parallel_size

    @property
    def ep(self) -> int:
        return self.parallel.expert_model_parallel_size

    @property
    def etp(self) -> int:
        """Expert TP; megatron-core defaults it to the TP size."""
        return self.parallel.expert_tensor_parallel_size or self.tp

    @property
    def vp(self) -> int:
        return self.parallel.virtual_pipeline_model_parallel_size or 1

    @property
    def sp(self) -> bool:
        return bool(self.parallel.sequence_parallel) and self.tp > 1

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        return self.world_size // (self.etp * self.ep * self.pp)

    @property
    def distributed_optimizer(self) -> bool:
        """Optimizer state sharded over DP: ``trainer.parallel.use_distributed_optimizer``, unset meaning DP > 1 (as
        ``trainer.build.distributed_optimizer`` decides)."""
        flag = self.parallel.use_distributed_optimizer
        return self.dp > 1 if flag is None else bool(flag)

    def describe(self) -> str:
        parts = [f"TP={self.tp}", f"PP={self.pp}"]
        parts += [f"{k}={v}" for k, v in self.parallel.pipeline_split().items()]
        if self.vp > 1:
            parts.append(f"VPP={self.vp}")
        if self.cp > 1:
            parts.append(f"CP={self.cp}")
        if self.ep > 1 or self.etp != self.tp:
            parts += [f"EP={self.ep}", f"ETP={self.etp}"]
        parts.append(f"DP={self.dp}")
        if self.sp:
            parts.append("SP")
        return " ".join(parts)


def validate_layout(layout: Layout, models: dict[str, GPTModelConfig]) -> None:
    """Raise :class:`LayoutError` (every problem, naming the keys) when ``layout`` cannot run ``models``; the rules
    are :meth:`ParallelConfig.problems`'."""
    layout.parallel.validate(layout.world_size, *models.items())


# ------------------------------------------------------------------------------------------ parameter counts
def _expert_ffn(cfg: GPTModelConfig) -> int:
    return cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size  # megatron-core's default


def _moe_pattern(cfg: GPTModelConfig) -> list[int]:
    """1 for a MoE layer, 0 for a dense one (megatron-core's ``moe_layer_freq``: an int period or a list)."""
    if not cfg.num_moe_experts:
        return [0] * cfg.num_layers
    freq = cfg.transformer_overrides.get("moe_layer_freq", getattr(cfg, "moe_layer_freq", 1))
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(cfg.num_layers)]
    return [int(x) for x in freq]


def stage_layers(cfg: GPTModelConfig, layout: Layout, stage: int) -> list[int]:
    """Global layer numbers on pipeline rank ``stage`` (its ``vp`` interleaved chunks), as megatron-core places
    them under the layout's pipeline split (even, or uneven: ``trainer.parallel.num_layers_in_*_pipeline_stage``,
    ``account_for_*_in_pipeline_split``)."""
    split = tuple(sorted(layout.parallel.pipeline_split().items()))
    return list(_stage_layers(cfg.num_layers, layout.pp, layout.vp, split, stage))


@functools.lru_cache(maxsize=4096)
def _stage_layers(num_layers: int, pp: int, vp: int, split: tuple, stage: int) -> tuple[int, ...]:
    return tuple(stage_layer_numbers(num_layers, pp, vp, dict(split), stage))


@dataclass
class ParamCount:
    """Parameters of one rank: ``expert`` the routed experts (``mlp.experts``; megatron reduces them over expert DP
    when EP > 1, in buffers of their own), ``dense`` all others (reduced over DP)."""

    dense: int = 0
    expert: int = 0

    @property
    def total(self) -> int:
        return self.dense + self.expert


def attention_params(cfg: GPTModelConfig, t: int) -> int:
    """h (input norm) + (a + 2g) d h / t (fused QKV) [+ (a + 2g) d / t bias] [+ 2d QK-norm] + a d h / t (proj)."""
    h, d, a, g = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    qkv = (a + 2 * g) * d
    return h + qkv * h // t + (qkv // t if cfg.add_qkv_bias else 0) + (2 * d if cfg.qk_layernorm else 0) + a * d * h // t


def dense_mlp_params(cfg: GPTModelConfig, t: int) -> int:
    """h (pre-MLP norm) + 2 F h / t (gate and up) + F h / t (down)."""
    return cfg.hidden_size + 3 * cfg.ffn_hidden_size * cfg.hidden_size // t


def moe_params(cfg: GPTModelConfig, t: int, e: int, et: int) -> ParamCount:
    """Non-expert: h (pre-MLP norm) + E h (router, replicated) + 3 Fs h / t (shared experts) [+ h shared-expert
    gate]; expert: (E / e) * 3 Fm h / et (each local expert's gate, up and down)."""
    h, n = cfg.hidden_size, cfg.num_moe_experts or 0
    shared = 3 * (cfg.moe_shared_expert_intermediate_size or 0) * h // t
    if getattr(cfg, "moe_shared_expert_gate", False) or cfg.transformer_overrides.get("moe_shared_expert_gate"):
        shared += h
    return ParamCount(dense=h + n * h + shared, expert=(n // e) * 3 * _expert_ffn(cfg) * h // et)


def rank_params(cfg: GPTModelConfig, layout: Layout, stage: int) -> ParamCount:
    """This PP rank's parameters (identical on every TP/EP/DP rank of the stage when E divides by e).

    First stage: V h / t (word embeddings). Last stage: h (final norm) + V h / t (output layer) unless the
    embeddings are tied and p = 1 (tied with p > 1: the last stage holds its own copy, kept in sync).
    """
    t, v_rows, h = layout.tp, cfg.padded_vocab(layout.tp), cfg.hidden_size
    out = ParamCount()
    pattern = _moe_pattern(cfg)
    for layer in stage_layers(cfg, layout, stage):
        out.dense += attention_params(cfg, t)
        if pattern[layer]:
            moe = moe_params(cfg, t, layout.ep, layout.etp)
            out.dense += moe.dense
            out.expert += moe.expert
        else:
            out.dense += dense_mlp_params(cfg, t)
    if stage == 0:
        out.dense += v_rows * h // t
    if stage == layout.pp - 1:
        out.dense += h
        if not cfg.tie_word_embeddings or layout.pp > 1:
            out.dense += v_rows * h // t
    return out


def model_params(cfg: GPTModelConfig) -> dict[str, int]:
    """Whole-model totals (unpadded vocabulary, tied weights once): ``total`` and ``active`` per token."""
    one = Layout(ParallelConfig(), 1)
    unpadded = GPTModelConfig.from_dict({**cfg.to_dict(), "padded_vocab_size": cfg.vocab_size})
    total = rank_params(unpadded, one, 0).total
    n, k = cfg.num_moe_experts or 0, cfg.moe_router_topk
    per_expert = 3 * _expert_ffn(cfg) * cfg.hidden_size
    inactive = sum(_moe_pattern(cfg)) * (n - k) * per_expert if n else 0
    return {"total": total, "active": total - inactive}


# ------------------------------------------------------------------------------------------------ workload
@dataclass
class Workload:
    """What one DP rank processes in a step (the recipe's per-rank sizes)."""

    prompts: int  # data.prompts_per_step (per DP rank)
    n_samples: int  # xopd.n_samples
    modalities: int  # 2 when 0 < lam < 1, else 1
    prompt_tokens: int  # trainer.rollout.max_prompt_tokens (speech prompts with the audio expanded)
    new_tokens: int  # trainer.rollout.max_new_tokens
    micro_batch: int  # trainer.micro_batch_size
    loss: str = "sampled_token"  # xopd.loss
    divergence_form: str = "linear"  # xopd.divergence_form: how reverse_kl / jsd read the vocabulary
    offload_teacher: bool = False
    recompute: str | None = None  # None | selective | full
    flash_attention: bool = True  # fused/flash core attention (TE on GPU): no s^2 score matrix kept
    chunk_elements: int = LOGITS_CHUNK_ELEMENTS["cuda"]
    perception_params: int = 0  # on the first stage (frozen parts fp32 as built, trainable ones in the LLM's dtype)
    perception_trainable: int = 0
    freeze_llm: bool = False

    @property
    def rollouts(self) -> int:
        return self.prompts * self.modalities * self.n_samples

    @property
    def seq_len(self) -> int:
        return self.prompt_tokens + self.new_tokens


# -------------------------------------------------------------------------------------------------- activations
def layer_activation_bytes(
    cfg: GPTModelConfig, layout: Layout, tokens: int, seq: int, moe: bool, *, flash: bool = True
) -> int:
    """Bytes one transformer layer keeps for backward for ``tokens`` = b s tokens (16-bit activations).

    Korthikanti et al. 2022 (arXiv 2205.05198) Sec. 4, generalised to GQA, SwiGLU and MoE, without dropout:
      norms and linear inputs in the SP region: 2 b s h x 4 / sp  (sp = t with sequence parallelism, else 1)
      Q, K, V: 2 b s (a + 2g) d / t;  attention output (proj input): 2 b s a d / t
      unfused attention only: 4 b s^2 a / t (scores and softmax; flash/fused attention keeps neither)
      dense MLP: 2 b s (2F + F) / t (gate/up output, SwiGLU output)
      MoE: 4 b s E / sp (fp32 router logits) + (b s k et / sp) (4h + 6 Fm / et) (routed copies: expert input
           and output, gate/up and SwiGLU outputs) + 6 b s Fs / t (shared experts)
    """
    h, d, a, g = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    t = layout.tp
    sp = t if layout.sp else 1
    tokens = tokens // layout.cp
    out = 2 * tokens * h * 4 // sp
    out += 2 * tokens * (a + 2 * g) * d // t + 2 * tokens * a * d // t
    batch = max(tokens // max(seq, 1), 1)
    if not flash:
        out += 4 * batch * (seq // layout.cp) * seq * a // t
    if moe:
        n, k, et = cfg.num_moe_experts or 0, cfg.moe_router_topk, layout.etp
        out += 4 * tokens * n // sp
        out += tokens * k * et // sp * (4 * h + 6 * _expert_ffn(cfg) // et)
        out += 6 * tokens * (cfg.moe_shared_expert_intermediate_size or 0) // t
    else:
        out += 6 * tokens * cfg.ffn_hidden_size // t
    return out


def activation_bytes(cfg: GPTModelConfig, layout: Layout, work: Workload, stage: int, recompute: str | None) -> int:
    """Activations a training micro-batch schedule keeps on PP rank ``stage``.

    Per micro-batch, sum over the rank's layers of :func:`layer_activation_bytes` (``recompute=None``), or
    ``full``: 2 b s h / sp per layer (each layer's input) plus one layer's activations (recomputed in backward);
    ``selective`` (megatron's core-attention recompute) drops only the unfused s^2 term. Micro-batches in flight
    under 1F1B: min(p - stage, M) (interleaved: x (1 + (p - 1) / (p v))), M = rollouts / b.
    """
    flash = work.flash_attention or recompute == "selective"
    b, s = work.micro_batch, work.seq_len
    tokens = b * s
    pattern = _moe_pattern(cfg)
    layers = stage_layers(cfg, layout, stage)
    per_layer = [layer_activation_bytes(cfg, layout, tokens, s, bool(pattern[i]), flash=flash) for i in layers]
    sp = layout.tp if layout.sp else 1
    if recompute == "full":
        kept = len(layers) * 2 * tokens // layout.cp * cfg.hidden_size // sp + max(per_layer, default=0)
    else:
        kept = sum(per_layer)
    micro_batches = max(math.ceil(work.rollouts / b), 1)
    in_flight = min(layout.pp - stage, micro_batches)
    factor = 1 + (layout.pp - 1) / (layout.pp * layout.vp) if layout.vp > 1 else 1
    embed = 2 * tokens // layout.cp * cfg.hidden_size // sp if stage == 0 else 0
    return int((kept + embed) * in_flight * factor)


def forward_working_bytes(cfg: GPTModelConfig, layout: Layout, tokens: int, seq: int) -> int:
    """A no-grad forward (teacher scoring, rollout prefill) frees each layer's tensors: about one layer's worth."""
    return max(layer_activation_bytes(cfg, layout, tokens, seq, bool(m)) for m in set(_moe_pattern(cfg)))


# ------------------------------------------------------------------------------------------------------ plan
@dataclass
class Line:
    name: str
    bytes: int
    formula: str


@dataclass
class PhasePlan:
    phase: str
    lines: list[Line] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return sum(line.bytes for line in self.lines)


@dataclass
class MemoryPlan:
    """Per-rank bytes of the worst pipeline stage, per phase; ``fits`` against ``gpu_bytes``."""

    layout: Layout
    stage: int
    student_params: ParamCount
    teacher_params: ParamCount
    phases: list[PhasePlan]
    gpu_bytes: int
    activations_no_recompute: int
    activations_recompute: dict[str, int]

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.phases)

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_bytes

    def to_dict(self) -> dict:
        return {
            "layout": self.layout.describe(),
            "stage": self.stage,
            "student_params": {"dense": self.student_params.dense, "expert": self.student_params.expert},
            "teacher_params": {"dense": self.teacher_params.dense, "expert": self.teacher_params.expert},
            "phases": {p.phase: {"peak": p.peak, **{l.name: l.bytes for l in p.lines}} for p in self.phases},
            "activations": {"none": self.activations_no_recompute, **self.activations_recompute},
            "peak": self.peak,
            "gpu_bytes": self.gpu_bytes,
            "fits": self.fits,
        }


def weight_lines(student: GPTModelConfig, layout: Layout, work: Workload, stage: int) -> dict[str, Line]:
    """Student weights, fp32 gradient buffers and Adam state of one rank (exact element counts)."""
    params = rank_params(student, layout, stage)
    wbytes = _BYTES[student.params_dtype]
    perception = work.perception_params if stage == 0 else 0
    perception_trainable = work.perception_trainable if stage == 0 else 0
    llm_trainable = ParamCount() if work.freeze_llm else params
    # Adam: exp_avg + exp_avg_sq (fp32) for every trainable param, + an fp32 main copy of 16-bit params.
    per_param = 2 * FP32 + (FP32 if wbytes < FP32 else 0)
    dense_shard = layout.dp * layout.cp if layout.distributed_optimizer else 1
    # megatron keeps routed experts in the dense buffers (sharded like them) unless EP > 1
    expert_shard = (layout.expert_dp if layout.ep > 1 else dense_shard) if layout.distributed_optimizer else 1
    optim = (math.ceil(llm_trainable.dense / dense_shard) * per_param
             + math.ceil(llm_trainable.expert / expert_shard) * per_param
             + math.ceil(perception_trainable / dense_shard) * per_param)  # trainable parts hold the LLM's dtype
    shard_note = (f"/ (DP*CP={dense_shard}), experts / {expert_shard}" if layout.distributed_optimizer else "(not sharded)")
    return {
        "student weights": Line("student weights",
                                params.total * wbytes + (perception - perception_trainable) * FP32
                                + perception_trainable * wbytes,
                                f"{params.dense:,} dense + {params.expert:,} expert params x {wbytes} B"
                                + (f" + {perception - perception_trainable:,} frozen perception x 4 B"
                                   if perception > perception_trainable else "")
                                + (f" + {perception_trainable:,} trainable perception x {wbytes} B"
                                   if perception_trainable else "")),
        "gradients": Line("gradients", (llm_trainable.total + perception_trainable) * FP32,
                          "trainable params x 4 B (fp32 grad buffers, grad_reduce_in_fp32)"),
        "optimizer": Line("optimizer", optim,
                          f"trainable params x {per_param} B (Adam m, v" + (", fp32 main" if per_param == 12 else "")
                          + f") {shard_note}"),
    }


def kv_cache_bytes(cfg: GPTModelConfig, layout: Layout, work: Workload, stage: int) -> int:
    """StaticInferenceContext: K and V [s, R, g / t, d] per local layer, R = prompts x modalities x n."""
    layers = len(stage_layers(cfg, layout, stage))
    return 2 * layers * work.seq_len * work.rollouts * (cfg.num_query_groups // layout.tp) * cfg.head_dim * _BYTES[cfg.params_dtype]


def plan_memory(
    student: GPTModelConfig, teacher: GPTModelConfig, layout: Layout, work: Workload, gpu_bytes: int
) -> MemoryPlan:
    """The plan of the pipeline stage with the largest peak (stage 0 holds the embeddings, perception and the
    most in-flight micro-batches; the last stage holds the output layer and the logits)."""
    validate_layout(layout, {"model.student.llm": student, "model.teacher.llm": teacher})
    plans = [_plan_stage(student, teacher, layout, work, gpu_bytes, s) for s in range(layout.pp)]
    return max(plans, key=lambda p: p.peak)


def _plan_stage(student, teacher, layout: Layout, work: Workload, gpu_bytes: int, stage: int) -> MemoryPlan:
    t, last = layout.tp, stage == layout.pp - 1
    v_local = student.padded_vocab(t) // t
    wb = _BYTES[student.params_dtype]
    weights = weight_lines(student, layout, work, stage)
    tparams = rank_params(teacher, layout, stage)
    teacher_bytes = tparams.total * _BYTES[teacher.params_dtype]
    teacher_line = Line("teacher weights", teacher_bytes, f"{tparams.total:,} params x {_BYTES[teacher.params_dtype]} B")
    offloaded = Line("teacher weights", 0, "offloaded to host (trainer.offload_teacher)")
    full_vocab = work.loss in ("reverse_kl", "jsd")
    # the linear form: every loss but top-k reads hidden states through the head shards, logits chunk by chunk
    reads_hidden = work.divergence_form == "linear" and not work.loss.startswith("topk")
    linear = full_vocab and reads_hidden
    tb, h_t, n_new = _BYTES[teacher.params_dtype], teacher.hidden_size, work.new_tokens
    # full-vocabulary losses: what the teacher pass keeps of the responses on the last stage until the training pass
    kept = []
    if linear:
        kept = [Line("teacher hidden kept", work.rollouts * n_new * h_t * tb if last else 0,
                     f"R={work.rollouts} x N={n_new} x H_t={h_t} x {tb} B (final hidden states)")]
    elif full_vocab:
        kept = [Line("teacher logits kept", work.rollouts * n_new * v_local * wb if last else 0,
                     f"R={work.rollouts} x N={n_new} x V/t={v_local} x {wb} B")]
    chunk = LINEAR_CHUNK_ELEMENTS  # [chunk rows, V/t] values of the linear form's logits chunks
    persistent = list(weights.values())

    # rollout: KV cache, one layer of the prefill, and the sampler's last-position logits.
    kv = kv_cache_bytes(student, layout, work, stage)
    # the rollout engine turns sequence parallelism off (rollout/engine.py): every TP rank holds all prompt tokens
    no_sp = replace(layout, parallel=replace(layout.parallel, sequence_parallel=False))
    prefill = forward_working_bytes(student, no_sp, work.prompts * work.modalities * work.prompt_tokens, work.prompt_tokens)
    sample_logits = work.rollouts * v_local * (wb + 2 * FP32) if last else 0
    rollout = PhasePlan("rollout", persistent + [
        offloaded if work.offload_teacher else teacher_line,
        Line("KV cache", kv, f"2 x {len(stage_layers(student, layout, stage))} layers x s={work.seq_len} x R={work.rollouts}"
             f" x g/t={student.num_query_groups // t} x d={student.head_dim} x {wb} B"),
        Line("prefill working set", prefill, "one layer of a no-grad forward over prompts x modalities x prompt tokens"
             + (", no SP (the rollout engine turns it off)" if layout.sp else "")),
        Line("sampling logits", sample_logits, f"R x V/t x ({wb} + 8) B (last-position logits, fp32 sampler temporaries)"),
    ])

    # teacher scoring: the teacher resident, micro-batches of b rollouts through a no-grad forward.
    b, s = work.micro_batch, work.seq_len
    if reads_hidden:
        t_out = Line("teacher hidden states", ((b * s + b * n_new) * h_t * tb + chunk * (tb + 2 * FP32)) if last else 0,
                     f"(b s + b N) x H_t x {tb} B (hidden states, response rows) + a logits chunk of 2^25 values "
                     f"({tb} B + 2 fp32 temporaries)")
    else:
        t_out = Line("teacher logits", (b * s * v_local * tb * 2 + 2 * work.chunk_elements * FP32) if last else 0,
                     f"2 x b={b} x s={s} x V/t x {tb} B + 2 fp32 chunks")
    teacher_phase = PhasePlan("teacher", persistent + [
        teacher_line,
        Line("forward working set", forward_working_bytes(teacher, layout, b * s, s), "one teacher layer, b x s tokens"),
        t_out,
        *kept,
    ])

    # training: activations of the in-flight micro-batches and the loss's logits buffers.
    act_none = activation_bytes(student, layout, work, stage, None)
    act_rc = {g: activation_bytes(student, layout, work, stage, g) for g in ("selective", "full")}
    act = act_none if work.recompute is None else act_rc[work.recompute]
    if linear:
        h = student.hidden_size
        head_grad = 0 if work.freeze_llm else v_local * h * FP32
        head_copy = v_local * h_t * tb if work.offload_teacher else 0
        loss_line = Line(
            "loss buffers",
            (2 * (b * s + b * n_new) * h * wb + b * n_new * h_t * tb + chunk * (5 * FP32 + 2 * wb) + head_grad
             + head_copy) if last else 0,
            f"2 x (b s + b N) x h x {wb} B (hidden states, response rows, their grads) + teacher micro-batch "
            f"b N H_t x {tb} B + 2^25-value chunks (at most 5 fp32 + 2 x {wb} B)"
            + (" + fp32 head-shard grad V/t x h" if head_grad else "")
            + (" + the offloaded teacher's head shard V/t x H_t" if head_copy else ""))
    elif reads_hidden:  # sampled-token / SFT log-probs from the hidden states (ops.fused_linear_logprobs)
        h = student.hidden_size
        head_grad = 0 if work.freeze_llm else v_local * h * FP32
        loss_line = Line(
            "loss buffers",
            (2 * (b * s + b * n_new) * h * wb + chunk * (FP32 + wb) + head_grad) if last else 0,
            f"2 x (b s + b N) x h x {wb} B (hidden states, response rows, their grads) + a 2^25-value logits chunk "
            f"(fp32 + {wb} B)" + (" + fp32 head-shard grad V/t x h" if head_grad else ""))
    else:
        full, resp = b * s * v_local * wb, b * n_new * v_local * wb
        slots = 8 if full_vocab else 2
        loss_line = Line(
            "loss logits",
            (2 * full + 2 * resp + slots * work.chunk_elements * FP32 + (resp if full_vocab else 0)) if last else 0,
            f"2 x (b s + b L) x V/t x {wb} B (logits, response logits, their grads)"
            + (" + teacher micro-batch copy" if full_vocab else "") + f" + {slots} fp32 chunks")
    training = PhasePlan("training", persistent + [
        offloaded if work.offload_teacher else teacher_line,
        *kept,
        Line("activations", act, f"recompute={work.recompute}, {min(layout.pp - stage, max(math.ceil(work.rollouts / b), 1))}"
             " micro-batch(es) in flight (Korthikanti et al. 2022, see docs/scaling.md)"),
        loss_line,
    ])
    return MemoryPlan(layout, stage, rank_params(student, layout, stage), tparams,
                      [rollout, teacher_phase, training], gpu_bytes, act_none, act_rc)


# -------------------------------------------------------------------------------------------- layout search
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggest_layout(
    student: GPTModelConfig, teacher: GPTModelConfig, work: Workload, world_size: int, gpu_bytes: int,
    *, max_tp: int = 8,
) -> MemoryPlan | None:
    """The smallest model-parallel layout that fits: fewest TP x PP ranks (most data parallelism), then the
    smallest EP, then ETP = 1 before ETP = TP (experts whole on each EP rank, as the public Qwen3-MoE recipes of
    Megatron-Bridge and slime run them); SP on whenever TP > 1; the vocabulary re-padded for each TP size (the
    student's embedding rows as given). Each PP size is tried with megatron's even split, then (where PP does not
    divide both models' layers) with the embedding, the loss or both counted as a layer of the split (one split,
    layer counts aside, for both models: ``trainer.parallel.account_for_*_in_pipeline_split``). ``None`` when
    nothing fits on ``world_size`` GPUs."""
    splits = [{}, {SPLIT_KEYS[2]: True}, {SPLIT_KEYS[3]: True}, {SPLIT_KEYS[2]: True, SPLIT_KEYS[3]: True}]
    experts = math.gcd(student.num_moe_experts or 0, teacher.num_moe_experts or 0) or 1
    candidates = []
    for tp in [d for d in _divisors(world_size) if d <= max_tp]:
        padded = common_padded_vocab([student, teacher], tp)
        configs = (replace(student, padded_vocab_size=padded), replace(teacher, padded_vocab_size=padded))
        for pp in _divisors(world_size // tp):
            for ep in _divisors(experts):
                for etp in sorted({tp, 1}):
                    for i, split in enumerate(splits if pp > 1 else splits[:1]):
                        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                  expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                                                  sequence_parallel=tp > 1, **split)
                        candidates.append(((tp * pp, ep, etp != 1, i), Layout(parallel, world_size), configs))
    for _, layout, (s_cfg, t_cfg) in sorted(candidates, key=lambda c: c[0]):
        try:
            plan = plan_memory(s_cfg, t_cfg, layout, work, gpu_bytes)
        except LayoutError:
            continue
        if plan.fits:
            return plan
    return None
