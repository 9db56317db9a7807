"""The teacher-scoring and training passes, through megatron's pipeline schedules (so PP and micro-batches work).

Rows are rollouts (prompt + sampled response). Each pass cuts them into micro-batches of equal size and length
(pipeline stages exchange fixed shapes), runs ``get_forward_backward_func()``, and computes what it needs on the
last pipeline stage from vocab-parallel logits, or, for the linear-form divergences, from the final hidden states
and the output-layer shards (``models/head.py``): nothing gathers the vocabulary. The loss of each micro-batch is
the loss kind's function in :mod:`megatron_xopd.algo.loss`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from ..algo import LOSS_FUNCTIONS, LossInputs, LossStats, PackedSequences, Rollouts, XOPDConfig, pack_sequences
from ..algo import (
    clear_teacher_scores,
    store_teacher_scores,
    reads_hidden,
    teacher_keeps,
    teacher_scores,
)
from ..data.dataset import pad_along_time
from ..models.head import hidden_states_output
from ..runtime.device import current_device
from ..runtime.parallel import expert_parallel_group
from ..runtime.reduce import max_over_group


@dataclass
class MicroBatch:
    rows: torch.Tensor  # indices into the Rollouts; -1 marks padding rows (weight 0)
    packed: PackedSequences
    audio_embeds: torch.Tensor | None  # [n_locators, H] in row-major order
    audio: tuple[torch.Tensor, torch.Tensor] | None = None  # padded perception inputs and lengths, row-major


def minibatch_rows(num_rows: int, minibatches: int) -> list[torch.Tensor]:
    """This rank's rows for each optimizer step of a rollout batch (``xopd.minibatches`` of them, fewer when no
    data-parallel rank has that many rows). Every rank makes the same number of steps, since each (DDP's gradient
    reduction, the optimizer, MoE all-to-alls) is collective: a rank with fewer rows gets empty mini-batches.
    Collective over the data-parallel group (one all-reduce)."""
    most = max_over_group([num_rows], parallel_state.get_data_parallel_group(), current_device())[0]
    return list(torch.arange(num_rows).tensor_split(min(minibatches, most)))


# Transformer Engine's FP8 GEMMs need token counts divisible by 16: with FP8 each TP rank's sequence shard is.
FP8_SEQ_MULTIPLE = 16


def micro_batches(
    rollouts: Rollouts, rows: torch.Tensor, size: int, *, teacher: bool, fp8: bool = False
) -> list[MicroBatch]:
    """Cut ``rows`` into micro-batches of exactly ``size`` rows (repeating a row with weight 0 to fill the
    last) and one common sequence length (a multiple of the TP size, times 16 for a model in ``fp8``), on this
    rank's device. No ``rows`` give one micro-batch of padding (row 0 with weight 0): the rank still joins the
    pass's collectives."""
    device = current_device()
    prompts = rollouts.teacher_prompts if teacher else rollouts.student_prompts
    real = rows.tolist()
    seq_len = max(len(prompts[r]) for r in real or [0]) + rollouts.responses.shape[1]
    multiple = parallel_state.get_tensor_model_parallel_world_size() * (FP8_SEQ_MULTIPLE if fp8 else 1)
    seq_len = -(-seq_len // multiple) * multiple  # SP splits the sequence over TP; causal: padding is inert
    out = []
    for start in range(0, max(len(real), 1), size):
        chunk = real[start : start + size]
        fill = [-1] * (size - len(chunk))
        src = chunk + [chunk[-1] if chunk else 0] * len(fill)
        packed = pack_sequences(
            [prompts[r] for r in src], rollouts.responses[src].cpu(), rollouts.lengths[src].cpu(), seq_len=seq_len
        ).to(device)
        embeds, inputs = None, None
        if not teacher and rollouts.audio_inputs is not None:
            parts = [rollouts.audio_inputs[r] for r in src if rollouts.audio_inputs[r] is not None]
            if parts:
                padded, lens = pad_along_time(parts)
                inputs = (padded.to(device), lens.to(device))
        elif not teacher:
            parts = [rollouts.audio_embeds[r] for r in src if rollouts.audio_embeds[r] is not None]
            embeds = torch.cat(parts).to(device) if parts else None
        out.append(MicroBatch(torch.tensor(chunk + fill, device=device), packed, embeds, inputs))
    return out


def pad_for_expert_parallelism(model: torch.nn.Module, batches: list[MicroBatch]) -> list[MicroBatch]:
    """Under expert parallelism, as many micro-batches as the rank of the expert-parallel group with the most.

    Each micro-batch's forward (and backward) runs all-to-alls over that group, whose ranks hold different rows:
    a rank with fewer would leave the others waiting. The added micro-batches repeat the last one with every row
    marked padding (-1): zero weight and mask, so they add nothing to the loss, the gradient or the teacher scores.
    Without expert parallelism (or MoE layers) ``batches`` is returned as is, with no collective.
    """
    group = expert_parallel_group(get_model_config(model))
    if group is None:
        return batches
    count = max_over_group([len(batches)], group, current_device())[0]
    last = batches[-1]
    pad = MicroBatch(torch.full_like(last.rows, -1), last.packed, last.audio_embeds, last.audio)
    return batches + [pad] * (count - len(batches))


def _run(model: torch.nn.Module, batches: list[MicroBatch], forward_only: bool, loss_fn: Callable, student: bool) -> None:
    def forward_step(data_iterator, model):
        mb: MicroBatch = next(data_iterator)
        kwargs = {}
        if student and mb.audio is not None:
            kwargs = {"audio": mb.audio[0], "audio_lens": mb.audio[1]}
        elif student:
            kwargs = {"audio_embeds": mb.audio_embeds}
        output = model(mb.packed.input_ids, mb.packed.position_ids, None, **kwargs)
        return output, lambda out: loss_fn(mb, out)

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=batches[0].packed.input_ids.shape[1],
        micro_batch_size=batches[0].packed.input_ids.shape[0],
        forward_only=forward_only,
    )


@torch.no_grad()
def score_with_teacher(
    teacher: torch.nn.Module, rollouts: Rollouts, micro_batch_size: int, text_vocab_size: int, cfg: XOPDConfig
) -> None:
    """Teacher log-probs of every sampled token given T, and what the loss reads (:func:`teacher_keeps`)."""
    keep = teacher_keeps(cfg)
    batches = pad_for_expert_parallelism(
        teacher, micro_batches(rollouts, torch.arange(len(rollouts)), micro_batch_size, teacher=True,
                               fp8=bool(get_model_config(teacher).fp8)))
    with hidden_states_output(teacher) if reads_hidden(cfg) else contextlib.nullcontext() as head:
        clear_teacher_scores(rollouts, head if keep == "hidden" else None)  # the head the loss reads

        def collect(mb: MicroBatch, output: torch.Tensor):
            store_teacher_scores(rollouts, mb.rows, teacher_scores(output, mb.packed, keep, text_vocab_size, cfg, head))
            return output.new_zeros(()), {}

        _run(teacher, batches, True, collect, student=False)


def train_pass(
    model: torch.nn.Module,
    rollouts: Rollouts,
    rows: torch.Tensor,
    cfg: XOPDConfig,
    micro_batch_size: int,
    text_vocab_size: int,
    stats: LossStats,
    *,
    minibatches: int = 1,
) -> None:
    """Forward and backward of the ``xopd.loss`` over ``rows`` (gradients accumulate in megatron's DDP buffers).

    Each micro-batch's loss (its share of the step loss, see :mod:`megatron_xopd.algo.loss`) is multiplied by
    the number of micro-batches (padded ones included, see :func:`pad_for_expert_parallelism`) and the DP size,
    which megatron's schedule and DDP divide by: the gradient is
    that of the whole step's loss. With ``minibatches`` > 1 optimizer steps per rollout batch, each mini-batch's
    loss is scaled up to a full-batch mean.
    """
    batches = pad_for_expert_parallelism(
        model, micro_batches(rollouts, rows, micro_batch_size, teacher=False, fp8=bool(get_model_config(model).fp8)))
    scale = len(batches) * parallel_state.get_data_parallel_world_size() * minibatches
    loss_kind = LOSS_FUNCTIONS[cfg.loss]
    hidden = reads_hidden(cfg)

    def loss_fn(mb: MicroBatch, output: torch.Tensor):
        device = output.device
        real = (mb.rows >= 0).to(device)
        src = mb.rows.clamp(min=0)

        def rows_of(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[src.to(tensor.device)].to(device)

        teacher_logits = None
        if rollouts.teacher_logits is not None:
            teacher_logits = torch.stack([rollouts.teacher_logits[r] for r in src.tolist()]).to(device)
        inputs = LossInputs(
            logits=output,
            packed=mb.packed,
            mask=mb.packed.response_mask.to(device) * real.unsqueeze(1),
            weights=rows_of(rollouts.weights) * real,
            old_logprobs=rows_of(rollouts.old_logprobs),
            teacher_logprobs=rows_of(rollouts.teacher_logprobs),
            teacher_logits=teacher_logits,
            text_vocab_size=text_vocab_size,
            head_weight=head,
            teacher_hidden=rows_of(rollouts.teacher_hidden),
            teacher_head=None if rollouts.teacher_head is None else rollouts.teacher_head.to(device),
            teacher_topk_ids=rows_of(rollouts.teacher_topk_ids),
            teacher_topk_logprobs=rows_of(rollouts.teacher_topk_logprobs),
        )
        out = loss_kind(inputs, cfg)
        stats.add(inputs, out, rows_of(rollouts.modality), cfg)
        return out.loss * scale, {}

    # the linear form: the model returns hidden states and loss_fn reads the student's head shard ``head``
    with hidden_states_output(model) if hidden else contextlib.nullcontext() as head:
        _run(model, batches, False, loss_fn, student=True)
