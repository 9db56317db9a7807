"""On-policy generation on the live (training) model: TP/PP, KV cache, speech-conditioned prompts.

The engine drives the model the optimizer updates, through megatron-core's inference pieces:

* ``StaticInferenceContext`` holds the KV cache: ``GPTModel.forward(..., inference_context=ctx)`` appends each
  layer's keys/values at ``ctx.sequence_len_offset`` and attends over the cached prefix.
* ``GPTInferenceWrapper`` runs each forward step, including the pipeline-parallel receive/send of activations
  (``forward_pass_with_pipeline_parallel_small_input_batch``) and the offset bookkeeping. Its ``_forward`` is
  overridden only to pass the speech student's ``audio_embeds``. Its ``run_one_forward_step`` is not used
  because it runs under ``torch.inference_mode``: inference tensors (the KV cache, the rotary table megatron
  memoises with ``lru_cache``) must not leak into the training step that follows; we run under ``no_grad``.
* The logits stay vocab-parallel: nothing gathers the vocabulary (see :func:`vocab_parallel_logits` for how
  ``GPTModel``'s "inference must always gather TP logits" assertion is met).

Why not ``TextGenerationController``: it gathers the full-vocabulary logits on every TP rank
(``runtime_gather_output=True``) and broadcasts them over the pipeline, samples from the padded vocabulary,
needs a tokenizer, times steps with ``torch.cuda.Event`` (no CPU path), has no n-samples-per-prompt cache
sharing and no audio. ``DynamicInferenceEngine`` (paged cache, ragged batches) needs flash-attention kernels and
CUDA, so it cannot be the one code path that the CPU tests exercise.

Batch layout. With the local layer spec (:func:`~megatron_xopd.models.attention.padded_rows_supported`) prompts
are *left-padded*: one prefill forward runs every prompt to its end (all prompts end at the same cache slot, a
boolean mask hides the padding slots and each row is rotated at its own positions, as ``transformers`` does with
an attention mask), so a batch of prompt lengths ``p_min..p_max`` makes ``max_new_tokens`` decode forwards. With
other attention (Transformer Engine), whose inference path takes no padding mask, megatron's static-batching
scheme is kept: prompts are right-padded, the batch is prefilled up to the shortest prompt, and a row still
inside its prompt is fed its next prompt token (teacher forcing through the cache), which costs
``p_max - p_min`` extra decode forwards. Either way each row is computed as it would be alone.

Finished rows leave the batch: after a step where samples stop, the KV cache keeps only the rows still
generating (:meth:`~megatron_xopd.models.attention.PaddedStaticContext.keep_rows`), so no forward computes a
stopped row.

n samples per prompt: the ``B`` prompts are prefilled once; the cache rows are then copied to the ``B * n``
sample rows (``StaticInferenceContext.swap_key_value_dict``), which then decode independently.

Parallelism: the last pipeline stage samples with :func:`sample_vocab_parallel` (small per-shard summaries
exchanged over the TP group, never the logits). At PP > 1 the decode is pipelined
(:meth:`RolloutEngine._generate_pipelined`): the prompts are split into as many groups as there are stages, each
with its own KV cache, and the groups flow through the stages like micro-batches, so that stage k forwards group g
while stage k + 1 forwards group g - 1 (the prefill is micro-batched the same way); only the sampled token ids
travel back from the last stage to the first, and one broadcast at the end gives every rank of the
model-parallel group identical outputs. ``pipelined=False`` keeps the sequential decode (every stage in turn,
megatron's small-batch pipeline forward, the tokens and log-probs broadcast at every step). megatron's
``broadcast_from_last_pipeline_stage`` asserts CUDA tensors, so the broadcast is a plain
``torch.distributed.broadcast`` over megatron's pipeline group. Under expert parallelism (an MoE model at EP > 1)
the ranks of the expert-parallel group hold different prompts but each MoE forward is an all-to-all over them:
they agree at every check of which rows are done (see :meth:`RolloutEngine._any_in_group`), and a rank without prompts joins
the others' generation (:meth:`RolloutEngine.generate_or_join`).

Life cycle: :meth:`RolloutEngine.generate` puts the model in eval mode (dropout off), turns sequence
parallelism off (megatron's static inference does not support it) and runs under ``no_grad``; on exit it
restores every module's training flag and sequence parallelism and frees the KV cache, so nothing
inference-only survives into the training phase. No weights are copied: the engine holds a reference to the
model and reads its current parameters at every call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
from megatron.core.inference.utils import get_attention_mask
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnBackend
from megatron.core.utils import get_attr_wrapped_model, get_model_config

from ..models.attention import PaddedStaticContext, padded_rows_supported
from ..models.speech import SpeechStudent, expand_audio_locators
from ..runtime.cpu_compat import device_mode_suspended
from ..runtime.parallel import expert_parallel_group
from ..runtime.reduce import max_over_group

from ..ops.sampling import SamplingParams, row_keys, sample_vocab_parallel


@dataclass
class RolloutBatch:
    """The samples of one :meth:`RolloutEngine.generate` call; identical on every rank of the model-parallel group.

    Sample ``i`` continues prompt ``sample_to_prompt[i]`` (samples of a prompt are consecutive: ``i // n``).
    Prompts are the *expanded* ones (one audio-locator id per perception frame), as the student sees them.
    ``tokens[i, :lengths[i]]`` is the response (ending with the stop token when ``finished[i]``), the rest is
    ``pad_id``. ``logprobs`` are the model's log-probs of the sampled tokens at temperature 1 over the text
    vocabulary (what the trainer recomputes: the importance ratio starts at 1); ``sampling_logprobs`` those
    under the distribution sampled from (temperature/top-k/top-p; 0 for greedy). Both are 0 past ``lengths``.
    """

    tokens: torch.Tensor  # [B*n, T] int64
    lengths: torch.Tensor  # [B*n] int64
    logprobs: torch.Tensor  # [B*n, T] float32
    sampling_logprobs: torch.Tensor  # [B*n, T] float32
    finished: torch.Tensor  # [B*n] bool: stopped on a stop id (False: hit max_new_tokens)
    prompt_ids: torch.Tensor  # [B, P] int64, right-padded with pad_id
    prompt_lengths: torch.Tensor  # [B] int64
    sample_to_prompt: torch.Tensor  # [B*n] int64
    audio_frames: torch.Tensor  # [B] int64: perception frames spliced into each prompt (0: text prompt)

    @property
    def num_samples(self) -> int:
        return self.tokens.shape[0]

    def sequences(self, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt + response per sample: ids [B*n, L] right-padded, lengths [B*n], and a mask [B*n, L] of the
        response positions (the tokens whose log-probs ``logprobs`` holds, in order)."""
        plen = self.prompt_lengths[self.sample_to_prompt]
        total = plen + self.lengths
        width = int(total.max())
        ids = torch.full((self.num_samples, width), pad_id, dtype=torch.int64, device=self.tokens.device)
        mask = torch.zeros(self.num_samples, width, dtype=torch.bool, device=self.tokens.device)
        for i in range(self.num_samples):
            pl, n = int(plen[i]), int(self.lengths[i])
            ids[i, :pl] = self.prompt_ids[self.sample_to_prompt[i], :pl]
            ids[i, pl : pl + n] = self.tokens[i, :n]
            mask[i, pl : pl + n] = True
        return ids, total, mask


@dataclass
class _Layout:
    """One generation's batch layout and output buffers (:meth:`RolloutEngine._layout`)."""

    n_prompts: int
    n: int
    rows: int
    max_new: int
    s_max: int
    p_max: int
    prefill: int  # cache slots the prefill forward covers
    plen: torch.Tensor  # [B]
    prompt_ids: torch.Tensor  # [B, P] right-padded (the batch's output)
    block: torch.Tensor  # [B, P] the prompt block the model reads (left- or right-padded)
    pad: torch.Tensor | None  # [B] left padding per prompt (None: right-padded layout)
    audio_index: torch.Tensor | None  # [B, P] row of ``embeds`` per locator position, -1 elsewhere
    embeds: torch.Tensor | None  # concatenated audio embeddings (first stage)
    sample_to_prompt: torch.Tensor  # [B*n]
    row_end: torch.Tensor  # [B*n] the column of each sample's first response token
    row_pad: torch.Tensor | None  # [B*n]
    seq: torch.Tensor  # [B*n, S] prompt block + generated tokens
    out_tok: torch.Tensor
    out_lp: torch.Tensor
    out_slp: torch.Tensor
    count: torch.Tensor
    done: torch.Tensor
    finished: torch.Tensor
    stop: torch.Tensor
    frames: list[int]

    def window_audio(self, prompt_rows: torch.Tensor, a: int, b: int) -> torch.Tensor | None:
        """The audio embeddings of cache slots [a, b) of ``prompt_rows`` (row-major), None without any."""
        if self.audio_index is None or self.embeds is None or a >= self.p_max:
            return None
        sel = self.audio_index[prompt_rows, a : min(b, self.p_max)]
        sel = sel[sel >= 0]
        return self.embeds[sel] if sel.numel() else None

    def record(self, idx: torch.Tensor, tok: torch.Tensor, lp: torch.Tensor | None, slp: torch.Tensor | None,
               where: torch.Tensor | None = None) -> None:
        """Append sampled tokens (and their log-probs where given) to rows ``idx``, only where ``where`` holds
        (a mask, applied without a host synchronisation); update done/finished."""
        at = self.count[idx]
        col = self.row_end[idx] + at
        if where is not None:  # rows left out keep their values (their indices are clamped into range)
            at, col = at.clamp(max=self.max_new - 1), col.clamp(max=self.seq.shape[1] - 1)
            tok = torch.where(where, tok, self.out_tok[idx, at])
            if lp is not None:
                lp, slp = torch.where(where, lp, self.out_lp[idx, at]), torch.where(where, slp, self.out_slp[idx, at])
        self.out_tok[idx, at] = tok
        if lp is not None:
            self.out_lp[idx, at] = lp
            self.out_slp[idx, at] = slp
        self.seq[idx, col] = tok if where is None else torch.where(where, tok, self.seq[idx, col])
        self.count[idx] += 1 if where is None else where.to(torch.int64)
        hit = torch.isin(tok, self.stop)
        if where is not None:
            hit &= where
        self.finished[idx] |= hit
        self.done[idx] |= hit | (self.count[idx] >= self.max_new)

    def batch(self) -> RolloutBatch:
        width = int(self.count.max())
        return RolloutBatch(
            tokens=self.out_tok[:, :width].clone(),
            lengths=self.count,
            logprobs=self.out_lp[:, :width].clone(),
            sampling_logprobs=self.out_slp[:, :width].clone(),
            finished=self.finished,
            prompt_ids=self.prompt_ids,
            prompt_lengths=self.plen,
            sample_to_prompt=self.sample_to_prompt,
            audio_frames=torch.tensor(self.frames, dtype=torch.int64, device=self.plen.device),
        )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


_SP_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


def _linear_without_autograd(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                             sequence_parallel: bool = False, **_backward_only: Any) -> torch.Tensor:
    """The forward of megatron's parallel-linear autograd Functions (``LinearWithGradAccumulationAndAsync-
    Communication``, ``LinearWithFrozenWeight``), the same ops, called without ``Function.apply``: under
    ``no_grad`` nothing is saved for a backward, and the Function's bookkeeping is per-layer overhead of every
    decode step. The other arguments only configure the backward."""
    if sequence_parallel:
        raise RuntimeError("rollouts run with sequence parallelism off (rollout_mode)")
    output = torch.matmul(input, weight.t())
    if bias is not None:
        output = output + bias
    return output


@contextlib.contextmanager
def rollout_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (dropout off), sequence parallelism off, no autograd; everything restored on exit.

    megatron's own parallel linears (the local spec's ``ColumnParallelLinear``/``RowParallelLinear``; Transformer
    Engine's are not touched) get an instance ``_forward_impl`` that is :func:`_linear_without_autograd`, removed
    on exit (their tensor-parallel communication stays megatron's).

    Sequence parallelism is switched off as megatron's static inference does (the attributes of
    ``megatron.core.transformer.utils.set_model_to_sequence_parallel``), but by hand: megatron's helper
    caches modules by ``id(model)`` forever and needs ``model.position_embedding_type``, which the speech
    student does not have. Only attributes that are on are turned off, and exactly those are turned back on.
    """
    modes = [(m, m.training) for m in model.modules()]
    config = get_model_config(model)
    flipped = [(m, a) for m in model.modules() for a in _SP_ATTRS if getattr(m, a, None) is True]
    sp_config = bool(config.sequence_parallel)
    linears = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
               and "_forward_impl" not in vars(m)]
    model.eval()
    for module, attr in flipped:
        setattr(module, attr, False)
    config.sequence_parallel = False
    for module in linears:
        module._forward_impl = _linear_without_autograd
    try:
        with torch.no_grad():
            yield
    finally:
        for module in linears:
            del module._forward_impl
        for module, training in modes:
            module.training = training
        for module, attr in flipped:
            setattr(module, attr, True)
        config.sequence_parallel = sp_config


def _keep_vocab_parallel(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook on the output layer: never gather the vocabulary."""
    return args, {**kwargs, "runtime_gather_output": False}


@contextlib.contextmanager
def vocab_parallel_logits(model: torch.nn.Module) -> Iterator[None]:
    """Keep the output layer's logits vocab-parallel in inference forwards.

    ``GPTModel._postprocess`` asserts ``runtime_gather_output`` whenever an inference context is passed ("Inference
    must always gather TP logits"): megatron's samplers work on full-vocabulary logits. Ours works on shards, so
    during rollouts a pre-hook on ``output_layer`` (the only consumer of the flag) turns the gather off; the hook
    is removed on exit.
    """
    inner = _unwrap(model)
    lm = inner.language_model if isinstance(inner, SpeechStudent) else inner
    layer = getattr(lm, "output_layer", None) if getattr(lm, "post_process", False) else None
    handle = layer.register_forward_pre_hook(_keep_vocab_parallel, with_kwargs=True) if layer is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


class _VocabParallelWrapper(GPTInferenceWrapper):
    """megatron's GPT inference wrapper, passing the student's audio; logits stay vocab-parallel through
    :func:`vocab_parallel_logits` (the flag passed here only satisfies ``GPTModel``'s assertion)."""

    def _forward(self, inference_input: dict[str, Any]) -> torch.Tensor:
        kwargs: dict[str, Any] = dict(inference_context=self.inference_context, runtime_gather_output=True)
        if inference_input.get("audio_embeds") is not None:
            kwargs["audio_embeds"] = inference_input["audio_embeds"]
        return self.model(
            inference_input["tokens"], inference_input["position_ids"], inference_input["attention_mask"], **kwargs
        )


class RolloutEngine:
    """Generation on ``model`` (a megatron ``GPTModel`` or :class:`SpeechStudent`, bare or wrapped in DDP).

    ``text_vocab_size``: ids the sampler may emit (defaults to the student's ``llm_cfg.text_vocab_size``).
    Call :meth:`generate` on every rank of the model-parallel group with the same prompts and params.
    ``pipelined=False`` decodes at PP > 1 with every stage in turn (megatron's small-batch pipeline forward),
    the reference the pipelined decode is checked and timed against. ``sync_every`` (k): the decode loop
    (outside the pipelined decode) reads back which rows are done, and drops them from the batch, every k steps
    only; between checks the loop itself makes no host synchronisation (megatron's MoE dispatch still syncs per
    layer, and speech prompts in the right-padded layout index by mask while the prompt is read). Default 4 on CUDA, 1 on CPU (where a read-back is free
    and a finished row's extra steps are not). The tokens do not depend on it.
    """

    def __init__(self, model: torch.nn.Module, text_vocab_size: int | None = None, *, pipelined: bool = True,
                 sync_every: int | None = None) -> None:
        self.model = model
        self.inner = _unwrap(model)
        self.is_speech = isinstance(self.inner, SpeechStudent)
        if text_vocab_size is None:
            if not self.is_speech:
                raise ValueError("RolloutEngine: pass text_vocab_size for a GPTModel")
            text_vocab_size = self.inner.llm_cfg.text_vocab_size
        self.text_vocab_size = int(text_vocab_size)
        self.config = get_model_config(model)
        self.context: PaddedStaticContext | None = None
        self.contexts: list[PaddedStaticContext] = []  # the groups' KV caches of a pipelined decode
        self.pipelined = pipelined  # at PP > 1: the pipelined decode (else every stage in turn, for comparison)
        device = next(self.inner.parameters()).device
        self.sync_every = int(sync_every if sync_every is not None else (4 if device.type == "cuda" else 1))
        if self.sync_every < 1:
            raise ValueError(f"RolloutEngine: sync_every must be >= 1, got {sync_every}")
        self.left_padded = padded_rows_supported(self.inner)  # the batch layout (module docstring)
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        self.first_stage = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        self.last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.ep_group = expert_parallel_group(self.config)

    # -- life cycle -------------------------------------------------------------------------------------

    def release(self) -> None:
        """Free the KV cache (called at the end of every :meth:`generate`)."""
        for context in [self.context, *self.contexts]:
            if context is not None:
                context.key_value_memory_dict.clear()
        self.context, self.contexts = None, []

    # -- prompts ----------------------------------------------------------------------------------------

    def _pp_broadcast(self, tensor: torch.Tensor, src_first: bool) -> torch.Tensor:
        if self.pp_size == 1:
            return tensor
        src = (
            parallel_state.get_pipeline_model_parallel_first_rank()
            if src_first
            else parallel_state.get_pipeline_model_parallel_last_rank()
        )
        dist.broadcast(tensor, src=src, group=self.pp_group)
        return tensor

    def _prepare_prompts(
        self,
        prompts: Sequence[Sequence[int]],
        audio: torch.Tensor | None,
        audio_lens: torch.Tensor | None,
        audio_embeds: Sequence[torch.Tensor] | None,
        device: torch.device,
    ) -> tuple[list[list[int]], torch.Tensor | None, list[int]]:
        """Expanded prompts, the concatenated audio embeddings (first stage) and the frames per prompt."""
        prompts = [[int(t) for t in p] for p in prompts]
        frames = [0] * len(prompts)
        if not self.is_speech:
            return prompts, None, frames
        loc = self.inner.audio_locator_id
        speech = [i for i, p in enumerate(prompts) if loc in p]
        if not speech:
            return prompts, None, frames
        embeds = None
        counts = torch.zeros(len(speech), dtype=torch.int64, device=device)
        if self.first_stage:
            if audio_embeds is None:
                if audio is None or audio_lens is None:
                    raise ValueError(f"{len(speech)} prompt(s) hold the audio locator but neither audio nor audio_embeds was given")
                audio_embeds = self.inner.embed_audio(audio, audio_lens)
            if len(audio_embeds) != len(speech):
                raise ValueError(f"{len(speech)} speech prompt(s) but {len(audio_embeds)} audio input(s)")
            counts = torch.tensor([len(e) for e in audio_embeds], dtype=torch.int64, device=device)
            embeds = torch.cat(list(audio_embeds)).to(device)
        counts = self._pp_broadcast(counts, src_first=True)
        for i, c in zip(speech, counts.tolist()):
            prompts[i] = expand_audio_locators(prompts[i], c, loc)
            frames[i] = c
        return prompts, embeds, frames

    # -- forward ----------------------------------------------------------------------------------------

    def _wrapper(self, max_batch: int, max_seq: int, context: PaddedStaticContext | None = None) -> _VocabParallelWrapper:
        self.context = context if context is not None else PaddedStaticContext(max_batch, max_seq)
        cfg = InferenceWrapperConfig(
            hidden_size=self.config.hidden_size,
            params_dtype=self.config.params_dtype,
            inference_batch_times_seqlen_threshold=-1,  # one micro-batch: the large-batch path gathers logits
            padded_vocab_size=0,  # unused: logits stay vocab-parallel
            inference_max_requests=max_batch,
            inference_max_seq_length=max_seq,
            fp32_residual_connection=self.config.fp32_residual_connection,
            fp8=self.config.fp8,  # megatron pads each TE linear's tokens to FP8's shape rules
        )
        return _VocabParallelWrapper(self.model, cfg, self.context)

    def _inputs(self, ids: torch.Tensor, start: int, audio_embeds: torch.Tensor | None) -> dict[str, Any]:
        """The model inputs of cache slots [start, start + ids.shape[1]) of ``self.context``."""
        rows, width = ids.shape
        end = start + width
        assert self.context is not None and self.context.sequence_len_offset == start
        positions = self.context.positions(width)
        if positions is not None:  # left-padded rows
            mask, position_ids = self.context.padding_mask(width), positions.t()
        else:
            mask = None
            if self.config.attention_backend == AttnBackend.local:
                mask = get_attention_mask(end)[..., start:end, :end]
            position_ids = torch.arange(start, end, device=ids.device).expand(rows, -1)
        return {"tokens": ids, "position_ids": position_ids, "attention_mask": mask, "audio_embeds": audio_embeds}

    def _forward(
        self, wrapper: _VocabParallelWrapper, ids: torch.Tensor, start: int, audio_embeds: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Run cache slots [start, start + ids.shape[1]) of ``ids`` through the model at ``sequence_len_offset``
        = ``start``; last-position vocab-parallel logits [R, V/TP] on the last stage, None elsewhere."""
        inp = self._inputs(ids, start, audio_embeds)
        if self.pp_size > 1:
            logits = wrapper.forward_pass_with_pipeline_parallel_small_input_batch(inp)
        else:
            logits = wrapper.forward_pass_without_pipeline_parallel(inp)
        return logits[:, -1] if logits is not None else None

    def _stage_forward(
        self,
        wrapper: _VocabParallelWrapper,
        context: PaddedStaticContext,
        ids: torch.Tensor,
        start: int,
        audio_embeds: torch.Tensor | None,
        received: torch.Tensor | None,
    ) -> torch.Tensor:
        """This stage's forward of one group's slots on its own KV cache, no pipeline communication: the hidden
        states [s, R, H] to send on, or on the last stage the vocab-parallel logits [R, s, V/TP]."""
        self.context = wrapper.inference_context = context
        inp = self._inputs(ids, start, audio_embeds)
        get_attr_wrapped_model(self.model, "set_input_tensor")(received)
        out = wrapper._forward(inp)
        context.increment_sequence_len_offset(ids.shape[1])
        return out

    def _any_in_group(self, local: bool, device: torch.device) -> bool:
        """This rank's ``local``, or under expert parallelism whether it holds on any rank of the expert-parallel
        group (one all-reduce, only then): whether to make another decode step, or to generate at all."""
        if self.ep_group is None:
            return local
        return bool(max_over_group([int(local)], self.ep_group, device)[0])

    # -- generation -------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        audio: torch.Tensor | None = None,
        audio_lens: torch.Tensor | None = None,
        audio_embeds: Sequence[torch.Tensor] | None = None,
        use_cache: bool = True,
    ) -> RolloutBatch:
        """Generate ``params.n`` responses per prompt.

        ``prompts``: token ids; a speech prompt holds one audio-locator id (the student's), and the speech
        prompts' audio is given, in prompt order, either as ``audio``/``audio_lens`` (the perception input
        batch) or as ``audio_embeds`` (one [frames, hidden] tensor each; needed on the first stage only).
        Text and speech prompts may be mixed. ``use_cache=False`` recomputes the whole prefix at every step
        (no state carried between steps): the reference the cache is checked and timed against.
        """
        if not prompts:
            raise ValueError("generate: no prompts")
        device = next(self.inner.parameters()).device
        with rollout_mode(self.model), vocab_parallel_logits(self.model):
            try:
                # The perception (a NeMo or transformers encoder) runs under the CPU layer's device mode; the
                # generation loop, megatron's inference path included, needs none of it (see
                # device_mode_suspended), and the mode's hook on every torch call is ~6% of a CPU rollout.
                prompts, embeds, frames = self._prepare_prompts(prompts, audio, audio_lens, audio_embeds, device)
                with device_mode_suspended():
                    return self._generate(prompts, embeds, frames, params, use_cache, device)
            finally:
                self.release()

    def generate_or_join(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        resident: Callable[[], ContextManager[None]] = contextlib.nullcontext,
        **inputs: Any,
    ) -> RolloutBatch | None:
        """:meth:`generate`, or ``None`` for no ``prompts``; under expert parallelism a rank without prompts still
        runs the forwards of the group's generation (each is an all-to-all over the group that its ranks must all
        join) on a one-token throwaway prompt. Call it on every rank of the group (one all-reduce there).
        ``resident`` is entered around a generation (e.g. to bring offloaded weights onto the device)."""
        device = next(self.inner.parameters()).device
        if not self._any_in_group(bool(prompts), device):
            return None
        with resident():
            if prompts:
                return self.generate(prompts, params, **inputs)
            self.generate([[params.pad_id]], replace(params, n=1))
        return None

    def _layout(self, prompts, embeds, frames, params: SamplingParams, device) -> _Layout:
        """The batch layout (module docstring) and the output buffers, the same on every rank."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate: empty prompt")
        n_prompts, n = len(prompts), params.n
        rows = n_prompts * n
        plen = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
        p_min, p_max = int(plen.min()), int(plen.max())
        max_new = params.max_new_tokens
        s_max = p_max + max_new
        limit = getattr(self.inner.language_model if self.is_speech else self.inner, "max_sequence_length", None)
        if limit is not None and s_max > limit:
            raise ValueError(
                f"generate: longest prompt ({p_max} tokens) + max_new_tokens ({max_new}) = {s_max} exceeds the "
                f"model's max_position_embeddings ({limit})"
            )

        cols = torch.arange(p_max, device=device)[None, :]
        flat = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=device)
        prompt_ids = torch.full((n_prompts, p_max), params.pad_id, dtype=torch.int64, device=device)
        prompt_ids[cols < plen[:, None]] = flat  # row-major: each prompt at the start of its row
        # The prompt block the model reads and the column where each prompt ends.
        if self.left_padded:
            pad = p_max - plen
            block = torch.full_like(prompt_ids, params.pad_id)
            block[cols >= pad[:, None]] = flat  # each prompt at the end of its row
            in_prompt, prompt_end, prefill = cols >= pad[:, None], torch.full_like(plen, p_max), p_max
        else:
            pad, block = None, prompt_ids
            in_prompt, prompt_end, prefill = cols < plen[:, None], plen, p_min
        # Row of the concatenated audio embeddings for each locator position (row-major), -1 elsewhere.
        audio_index = None
        if embeds is not None or any(frames):
            is_loc = (block == self.inner.audio_locator_id) & in_prompt
            audio_index = torch.where(is_loc, is_loc.flatten().cumsum(0).view_as(is_loc) - 1, -1)

        sample_to_prompt = torch.arange(n_prompts, device=device).repeat_interleave(n)
        row_end = prompt_end[sample_to_prompt]  # the column of each sample's first response token
        row_pad = None if pad is None else pad[sample_to_prompt]
        seq = torch.full((rows, s_max), params.pad_id, dtype=torch.int64, device=device)
        seq[:, :p_max] = block[sample_to_prompt]

        out_tok = torch.full((rows, max_new), params.pad_id, dtype=torch.int64, device=device)
        out_lp = torch.zeros(rows, max_new, dtype=torch.float32, device=device)
        out_slp = torch.zeros(rows, max_new, dtype=torch.float32, device=device)
        count = torch.zeros(rows, dtype=torch.int64, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        stop = torch.tensor(params.stop_ids, dtype=torch.int64, device=device)
        return _Layout(
            n_prompts, n, rows, max_new, s_max, p_max, prefill, plen, prompt_ids, block, pad, audio_index,
            embeds if self.first_stage else None, sample_to_prompt, row_end, row_pad, seq, out_tok, out_lp, out_slp,
            count, done, finished, stop, frames,
        )

    def _generate(self, prompts, embeds, frames, params: SamplingParams, use_cache, device) -> RolloutBatch:
        if self.pp_size > 1 and use_cache and self.pipelined:
            return self._generate_pipelined(self._layout(prompts, embeds, frames, params, device), params, device)
        lay = self._layout(prompts, embeds, frames, params, device)
        n_prompts, n, rows, s_max = lay.n_prompts, lay.n, lay.rows, lay.s_max
        block, pad, prefill, sample_to_prompt, row_end, row_pad = (
            lay.block, lay.pad, lay.prefill, lay.sample_to_prompt, lay.row_end, lay.row_pad)
        seq, count, done = lay.seq, lay.count, lay.done
        window_audio = lay.window_audio
        live = torch.arange(rows, device=device)  # the samples still generating, in KV-cache row order

        # Prefill the B prompts (up to the shortest one when right-padded), then copy the cache rows to the
        # B*n samples.
        wrapper = self._wrapper(rows, s_max)
        self.context.set_row_pad(pad)
        logits = self._forward(wrapper, block[:, :prefill], 0, window_audio(torch.arange(n_prompts, device=device), 0, prefill))
        if n > 1:
            if use_cache:
                self.context.swap_key_value_dict(sample_to_prompt)
            if logits is not None:
                logits = logits.repeat_interleave(n, dim=0)
        self.context.set_row_pad(row_pad)

        # The loop's own code makes no host synchronisation but every ``sync_every`` steps (the check of which rows are done,
        # after which they leave the batch); meanwhile a finished row is forwarded and sampled, never recorded.
        p, steps = prefill, 0
        while True:
            if live.numel():
                gen = (row_end[live] <= p) & ~done[live]  # rows of the batch that generate the token at p
                pack = torch.empty(live.numel(), 3, dtype=torch.float64, device=device)
                if self.last_stage:
                    keys = live if params.greedy else row_keys(params.seed, live, count[live])
                    out = sample_vocab_parallel(logits, params, keys, text_vocab_size=self.text_vocab_size)
                    pack[:, 0], pack[:, 1], pack[:, 2] = out.tokens, out.logprobs, out.sampling_logprobs
                pack = self._pp_broadcast(pack, src_first=False)
                lay.record(live, pack[:, 0].to(torch.int64), pack[:, 1].to(torch.float32), pack[:, 2].to(torch.float32),
                           where=gen)
            steps += 1
            check = steps % self.sync_every == 0  # on the same steps on every rank of an expert-parallel group
            if (check or p + 1 >= s_max) and live.numel():  # p + 1 == s_max: every row is done
                going = ~done[live]
                if not bool(going.all()):  # stopped samples leave the batch (the cache keeps >= 1 row)
                    if use_cache and bool(going.any()):
                        self.context.keep_rows(going.nonzero().squeeze(1))
                    live = live[going]
            if (check or (self.ep_group is None and not live.numel())) and not self._any_in_group(live.numel() > 0, device):
                break
            if live.numel() == 0:
                # Expert parallelism: another rank of the group still generates, and each of its forwards runs an
                # all-to-all that this rank must join. Forward one pad token at slot 0 (overwritten, never read:
                # this rank's samples are complete) and ignore the output.
                self.context.reset()
                self.context.set_row_pad(None)
                self._forward(wrapper, torch.full((1, 1), params.pad_id, dtype=torch.int64, device=device), 0, None)
            elif use_cache:
                logits = self._forward(wrapper, seq[live, p : p + 1], p, window_audio(sample_to_prompt[live], p, p + 1))
            else:
                self.context.reset()
                self.context.key_value_memory_dict.clear()
                self.context.set_row_pad(None if row_pad is None else row_pad[live])
                logits = self._forward(wrapper, seq[live, : p + 1], 0, window_audio(sample_to_prompt[live], 0, p + 1))
            p += 1

        return lay.batch()

    # -- pipelined decode (PP > 1) -----------------------------------------------------------------------

    def _generate_pipelined(self, lay: _Layout, params: SamplingParams, device: torch.device) -> RolloutBatch:
        """Decode at PP > 1 with every stage busy: the prompts are split into ``pp_size`` groups, each with its own
        KV cache, that flow through the stages like micro-batches (stage k forwards group g while stage k + 1
        forwards group g - 1). The first stage schedules: before each forward of a group it sends the next stage
        a header (what to run, which cache rows stay); every other stage follows the headers. The last stage
        samples and sends only the sampled token ids back to the first stage, which feeds them in at the group's
        next turn; at the end the last stage broadcasts the samples and their log-probs to the other stages.
        Each group is computed as it would be alone, so the samples equal the sequential engine's."""
        chunks = torch.arange(lay.n_prompts, device=device).tensor_split(self.pp_size)
        groups = []
        for prompts in chunks:
            rows = (prompts[:, None] * lay.n + torch.arange(lay.n, device=device)).flatten()
            groups.append(_Group(prompts, rows, PaddedStaticContext(max(rows.numel(), 1), lay.s_max), rows, pending=rows[:0]))
        self.contexts = [g.context for g in groups]
        wrapper = self._wrapper(max(g.rows.numel() for g in groups), lay.s_max, groups[0].context)
        header_size = 6 + max(g.rows.numel() for g in groups)
        if self.first_stage:
            self._pipeline_schedule(wrapper, lay, groups, header_size, params, device)
        else:
            self._pipeline_follow(wrapper, lay, groups, header_size, params, device)
        # The last stage holds the samples; one broadcast gives them to every stage.
        pack = torch.cat([lay.out_tok.double(), lay.out_lp.double(), lay.out_slp.double(), lay.count.double()[:, None],
                          lay.finished.double()[:, None]], dim=1)
        self._pp_broadcast(pack, src_first=False)
        m = lay.max_new
        lay.out_tok.copy_(pack[:, :m])
        lay.out_lp.copy_(pack[:, m : 2 * m])
        lay.out_slp.copy_(pack[:, 2 * m : 3 * m])
        lay.count.copy_(pack[:, 3 * m])
        lay.finished.copy_(pack[:, 3 * m + 1].bool())
        return lay.batch()

    def _after_prefill(self, lay: _Layout, group: _Group) -> None:
        """Copy the group's prefilled prompt rows to its samples' rows."""
        if lay.n > 1:
            group.context.swap_key_value_dict(torch.arange(group.prompts.numel(), device=lay.plen.device).repeat_interleave(lay.n))
        group.context.set_row_pad(None if lay.row_pad is None else lay.row_pad[group.rows])

    def _pipeline_schedule(self, wrapper, lay: _Layout, groups: list[_Group], header_size: int, params, device) -> None:
        """The first stage: feed each group in turn until every group is done (on every rank of the
        expert-parallel group, whose forwards must match one for one)."""
        nxt = parallel_state.get_pipeline_model_parallel_next_rank()
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        sends: list[Any] = []
        active = [True] * len(groups)
        while any(active):
            for g, group in enumerate(groups):
                if not active[g]:
                    continue
                keep = None
                if group.prefilled:
                    if group.receiving is not None:  # the tokens sampled from this group's last forward
                        work, tok = group.receiving
                        work.wait()
                        lay.record(group.pending, tok, None, None)
                        group.receiving = None
                    going = ~lay.done[group.live]
                    if not bool(going.all()):
                        keep = going.nonzero().squeeze(1)
                        group.live = group.live[going]
                    local = group.live.numel() > 0
                else:
                    local = group.prompts.numel() > 0
                if not self._any_in_group(local, device):
                    active[g] = False
                    continue
                ctx = group.context
                if not local:  # expert parallelism: join another rank's forward (see _generate)
                    kind, ids, start, audio = _DUMMY, torch.full((1, 1), params.pad_id, dtype=torch.int64, device=device), 0, None
                    ctx.reset()
                    ctx.set_row_pad(None)
                elif not group.prefilled:
                    kind, ids, start = _PREFILL, lay.block[group.prompts, : lay.prefill], 0
                    audio = lay.window_audio(group.prompts, 0, lay.prefill)
                    ctx.set_row_pad(None if lay.pad is None else lay.pad[group.prompts])
                else:
                    if keep is not None:
                        ctx.keep_rows(keep)
                    p = ctx.sequence_len_offset
                    kind, ids, start = _DECODE, lay.seq[group.live, p : p + 1], p
                    audio = lay.window_audio(lay.sample_to_prompt[group.live], p, p + 1)
                header = _header(header_size, kind, g, start, ids.shape, keep if kind == _DECODE else None, device)
                out = self._stage_forward(wrapper, ctx, ids, start, audio, None)
                for work in sends:
                    work.wait()
                sends = [dist.isend(header, dst=nxt, group=self.pp_group),
                         dist.isend(out.to(wrapper.pipeline_communication_dtype).contiguous(), dst=nxt, group=self.pp_group)]
                if kind == _PREFILL:
                    group.prefilled = True
                    self._after_prefill(lay, group)
                group.pending = _sampled_rows(lay, group, ctx.sequence_len_offset) if kind != _DUMMY else group.pending[:0]
                if group.pending.numel():
                    # Posted after this slot's sends: each pair of stages then meets its messages in one order
                    # (header, activations, tokens, next header, ...), which NCCL's in-order streams need.
                    tok = torch.empty(group.pending.numel(), dtype=torch.int64, device=device)
                    group.receiving = (dist.irecv(tok, src=last, group=self.pp_group), tok)
        for work in sends:
            work.wait()
        stop = torch.zeros(header_size, dtype=torch.int64, device=device)  # kind _STOP
        dist.send(stop, dst=nxt, group=self.pp_group)

    def _pipeline_follow(self, wrapper, lay: _Layout, groups: list[_Group], header_size: int, params, device) -> None:
        """A later stage: run what the headers say; the last stage samples and returns the tokens to the first."""
        prev = parallel_state.get_pipeline_model_parallel_prev_rank()
        nxt = None if self.last_stage else parallel_state.get_pipeline_model_parallel_next_rank()
        first = parallel_state.get_pipeline_model_parallel_first_rank()
        sends: list[Any] = []
        header = torch.empty(header_size, dtype=torch.int64, device=device)
        while True:
            dist.recv(header, src=prev, group=self.pp_group)
            kind, g, start, width, rows, n_keep = header[:6].tolist()
            if kind == _STOP:
                break
            group = groups[g]
            ctx = group.context
            if kind == _DUMMY:
                ctx.reset()
                ctx.set_row_pad(None)
            elif kind == _PREFILL:
                ctx.set_row_pad(None if lay.pad is None else lay.pad[group.prompts])
            elif n_keep >= 0:
                keep = header[6 : 6 + n_keep]
                group.live = group.live[keep]
                ctx.keep_rows(keep)
            received = torch.empty(width, rows, self.config.hidden_size, dtype=wrapper.pipeline_communication_dtype,
                                   device=device)
            dist.recv(received, src=prev, group=self.pp_group)
            ids = torch.zeros(rows, width, dtype=torch.int64, device=device)  # read by the first stage only
            out = self._stage_forward(wrapper, ctx, ids, start, None, received)
            for work in sends:
                work.wait()
            sends = []
            if nxt is not None:
                sends = [dist.isend(header.clone(), dst=nxt, group=self.pp_group),
                         dist.isend(out.to(wrapper.pipeline_communication_dtype).contiguous(), dst=nxt, group=self.pp_group)]
            if kind == _PREFILL:
                group.prefilled = True
                self._after_prefill(lay, group)
            if nxt is not None or kind == _DUMMY:
                continue
            logits = out[:, -1]
            if kind == _PREFILL and lay.n > 1:
                logits = logits.repeat_interleave(lay.n, dim=0)
            p = ctx.sequence_len_offset
            act = (lay.row_end[group.live] <= p).nonzero().squeeze(1)
            idx = group.live[act]
            if idx.numel():
                keys = idx if params.greedy else row_keys(params.seed, idx, lay.count[idx])
                sampled = sample_vocab_parallel(logits[act], params, keys, text_vocab_size=self.text_vocab_size)
                lay.record(idx, sampled.tokens, sampled.logprobs, sampled.sampling_logprobs)
                sends.append(dist.isend(sampled.tokens.contiguous(), dst=first, group=self.pp_group))
        if nxt is not None:
            dist.send(header, dst=nxt, group=self.pp_group)  # pass the stop on
        for work in sends:
            work.wait()


_STOP, _PREFILL, _DECODE, _DUMMY = 0, 1, 2, 3  # pipelined decode: what a header asks the next stage to run


@dataclass
class _Group:
    """One micro-batch of the pipelined decode: a slice of the prompts, their samples, its own KV cache."""

    prompts: torch.Tensor  # prompt indices of the group
    rows: torch.Tensor  # sample rows of the group
    context: PaddedStaticContext
    live: torch.Tensor  # its samples still generating, in cache-row order
    pending: torch.Tensor  # first stage: rows whose next token the last stage is sampling
    prefilled: bool = False
    receiving: tuple[Any, torch.Tensor] | None = None  # first stage: (irecv work, buffer) of those tokens


def _sampled_rows(lay: _Layout, group: _Group, p: int) -> torch.Tensor:
    """The group's rows that generate the token at cache slot ``p`` (the others still read their prompt)."""
    return group.live[lay.row_end[group.live] <= p]


def _header(size: int, kind: int, g: int, start: int, shape: torch.Size, keep: torch.Tensor | None,
            device: torch.device) -> torch.Tensor:
    """[kind, group, start slot, width, rows, kept rows (-1: all), kept row indices...] for the next stage."""
    header = torch.zeros(size, dtype=torch.int64, device=device)
    n_keep = -1 if keep is None else keep.numel()
    header[:6] = torch.tensor([kind, g, start, shape[1], shape[0], n_keep])
    if keep is not None:
        header[6 : 6 + n_keep] = keep
    return header
