"""The teacher-scoring and training passes, through megatron's pipeline schedules (so PP and micro-batches work).

Rows are rollouts (prompt + sampled response). Each pass cuts them into micro-batches of equal size and length
(pipeline stages exchange fixed shapes), runs ``get_forward_backward_func()``, and computes what it needs on the
last pipeline stage from vocab-parallel logits: nothing gathers the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..algo import CROSS_MODAL, IN_MODAL, XOPDConfig, policy_gradient_terms, weighted_loss
from ..data.dataset import pad_along_time
from ..ops import vocab_parallel_divergence
from .sequences import PackedSequences, pack_sequences, response_logits, response_logprobs


@dataclass
class Rollouts:
    """A step's rollouts, identical on every rank of a TP/PP group (``audio_embeds`` on the first stage only)."""

    modality: torch.Tensor  # [R] IN_MODAL | CROSS_MODAL
    prompt_index: torch.Tensor  # [R] index of the prompt in the batch
    student_prompts: list[list[int]]  # T prompt, or S prompt with the locator expanded to the audio frames
    teacher_prompts: list[list[int]]  # always the T prompt
    responses: torch.Tensor  # [R, L]
    lengths: torch.Tensor  # [R]
    old_logprobs: torch.Tensor  # [R, L] log p_old of each sampled token (0 past the length)
    audio_embeds: list[torch.Tensor | None]  # [frames, H] per speech rollout
    # the perception's inputs per speech rollout ([frames, D] features or [samples] audio), set when the
    # perception trains: the training pass then reruns it with gradients instead of using ``audio_embeds``
    audio_inputs: list[torch.Tensor | None] | None = None
    teacher_logprobs: torch.Tensor | None = None  # [R, L], last stage, after the teacher pass
    teacher_logits: list[torch.Tensor] | None = None  # per row [L, V/TP], for the divergence losses
    weights: torch.Tensor | None = None  # [R] c_j of the loss

    def __len__(self) -> int:
        return len(self.student_prompts)


@dataclass
class MicroBatch:
    rows: torch.Tensor  # indices into the Rollouts; -1 marks padding rows (weight 0)
    packed: PackedSequences
    audio_embeds: torch.Tensor | None  # [n_locators, H] in row-major order
    audio: tuple[torch.Tensor, torch.Tensor] | None = None  # padded perception inputs and lengths, row-major


def micro_batches(rollouts: Rollouts, rows: torch.Tensor, size: int, *, teacher: bool) -> list[MicroBatch]:
    """Cut ``rows`` into micro-batches of exactly ``size`` rows (repeating a row with weight 0 to fill the
    last) and one common sequence length."""
    prompts = rollouts.teacher_prompts if teacher else rollouts.student_prompts
    seq_len = max(len(prompts[r]) for r in rows.tolist()) + rollouts.responses.shape[1]
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size].tolist()
        fill = [-1] * (size - len(chunk))
        src = chunk + [chunk[-1]] * len(fill)
        packed = pack_sequences(
            [prompts[r] for r in src], rollouts.responses[src], rollouts.lengths[src], seq_len=seq_len
        )
        embeds, inputs = None, None
        if not teacher and rollouts.audio_inputs is not None:
            parts = [rollouts.audio_inputs[r] for r in src if rollouts.audio_inputs[r] is not None]
            inputs = pad_along_time(parts) if parts else None
        elif not teacher:
            parts = [rollouts.audio_embeds[r] for r in src if rollouts.audio_embeds[r] is not None]
            embeds = torch.cat(parts) if parts else None
        out.append(MicroBatch(torch.tensor(chunk + fill), packed, embeds, inputs))
    return out


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
    teacher: torch.nn.Module, rollouts: Rollouts, micro_batch_size: int, text_vocab_size: int, keep_logits: bool
) -> None:
    """Teacher log-probs of every sampled token given T (and its response logits for full-vocabulary losses)."""
    rows = torch.arange(len(rollouts))
    batches = micro_batches(rollouts, rows, micro_batch_size, teacher=True)
    logprobs = torch.zeros_like(rollouts.old_logprobs)
    logits: list[torch.Tensor | None] = [None] * len(rollouts)

    def collect(mb: MicroBatch, output: torch.Tensor):
        real = mb.rows >= 0
        lp = response_logprobs(output, mb.packed, text_vocab_size)
        logprobs[mb.rows[real]] = lp[real].float()
        if keep_logits:
            selected = response_logits(output, mb.packed)
            for i, r in enumerate(mb.rows.tolist()):
                if r >= 0:
                    logits[r] = selected[i].detach().clone()
        return output.new_zeros(()), {}

    _run(teacher, batches, True, collect, student=False)
    rollouts.teacher_logprobs = logprobs
    rollouts.teacher_logits = logits if keep_logits else None


@dataclass
class TrainStats:
    """Sums over a step's micro-batches on this rank (reduced across ranks by the trainer)."""

    objective: dict[int, float] = field(default_factory=lambda: {IN_MODAL: 0.0, CROSS_MODAL: 0.0})
    ratio_sum: float = 0.0
    ratio_max: float = 0.0
    ratio_count: float = 0.0
    loss: float = 0.0


def train_pass(
    model: torch.nn.Module,
    rollouts: Rollouts,
    rows: torch.Tensor,
    cfg: XOPDConfig,
    micro_batch_size: int,
    text_vocab_size: int,
    stats: TrainStats,
    *,
    minibatches: int = 1,
) -> None:
    """Forward and backward of the X-OPD loss over ``rows`` (gradients accumulate in megatron's DDP buffers).

    The loss of a micro-batch is -sum_j c_j sum_t r_jt A_jt (+sum_j c_j sum_t D_jt for the divergences,
    -sum_j c_j sum_t log p_theta(y_jt) for sft),
    multiplied by the number of micro-batches and the DP size, which megatron's schedule and DDP divide by:
    the gradient is that of the whole step's loss. With ``minibatches`` > 1 optimizer steps per rollout batch,
    each mini-batch's loss is scaled up to a full-batch mean.
    """
    batches = micro_batches(rollouts, rows, micro_batch_size, teacher=False)
    scale = len(batches) * parallel_state.get_data_parallel_world_size() * minibatches
    lam_of = {IN_MODAL: cfg.lam, CROSS_MODAL: 1.0 - cfg.lam}

    def loss_fn(mb: MicroBatch, output: torch.Tensor):
        real = mb.rows >= 0
        src = mb.rows.clamp(min=0)
        mask = mb.packed.response_mask.to(output.device) * real.unsqueeze(1).to(output.device)
        weights = rollouts.weights[src].to(output.device) * real.to(output.device)
        if cfg.loss == "sft":
            terms = response_logprobs(output, mb.packed, text_vocab_size)
            loss = weighted_loss(terms, mask, weights, maximise=True)
        elif cfg.loss == "sampled_token":
            new_lp = response_logprobs(output, mb.packed, text_vocab_size)
            advantages = (rollouts.teacher_logprobs[src] - rollouts.old_logprobs[src]).to(output.device)
            terms, ratio = policy_gradient_terms(new_lp, rollouts.old_logprobs[src].to(output.device), advantages, mask, cfg.clip_ratio)
            loss = weighted_loss(terms, mask, weights, maximise=True)
            valid = mask.bool()
            if valid.any():
                stats.ratio_sum += float(ratio[valid].sum())
                stats.ratio_max = max(stats.ratio_max, float(ratio[valid].max()))
                stats.ratio_count += float(valid.sum())
        else:
            student = response_logits(output, mb.packed)
            b, length, v_local = student.shape
            teacher = torch.stack([rollouts.teacher_logits[r] for r in src.tolist()]).to(output.device)
            terms = vocab_parallel_divergence(
                student.reshape(b * length, v_local),
                teacher.reshape(b * length, v_local),
                cfg.loss,
                beta=cfg.beta,
                temperature=cfg.kl_temperature,
                mask=mask.reshape(-1).bool(),
                vocab_size=text_vocab_size,
            ).view(b, length)
            loss = weighted_loss(terms, mask, weights, maximise=False)
        with torch.no_grad():
            per_row = (terms.detach() * mask).sum(dim=1) * weights
            modality = rollouts.modality[src].to(output.device)
            for m, w in lam_of.items():
                if w > 0:
                    stats.objective[m] += float(per_row[modality == m].sum()) / (w * cfg.coef)
        stats.loss += float(loss.detach())
        return loss * scale, {}

    _run(model, batches, False, loss_fn, student=True)
