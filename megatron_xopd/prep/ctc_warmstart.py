"""CTC warm start of a speech adapter against the LLM's own token embeddings (before the SFT alignment).

An untrained adapter learns slowly through the frozen LLM: on the mini replication's 256 spoken prompts, 64 SFT
steps on transcripts and 32 on the teacher's answers (about 15 CPU-minutes) left the student right on 3% of
held-out prompts from speech, against 40% from text. The frames carry the words (Whisper's encoder); what is
missing is a map into the embedding space the LLM reads. This stage trains that map alone, without running the
LLM: a CTC loss over the transcript's tokens, whose class vectors are the LLM's frozen input embeddings of the
tokens that occur in the transcripts (cosine similarity times a learned scale; one learned blank). Afterwards the
projection is rescaled so its outputs have the mean norm of those embeddings: each frame points at the token it
hears, at the scale the LLM expects. The SFT alignment then starts from these weights
(``model.student.perception_weights``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.dataset import pad_along_time
from ..models.speech import FeaturePerception

log = logging.getLogger("megatron_xopd")


@dataclass
class CTCWarmStartConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    log_every: int = 50


def _batch(examples: list[tuple[torch.Tensor, list[int]]], classes: dict[int, int]):
    features, lengths = pad_along_time([f for f, _ in examples])
    targets = torch.tensor([classes[t] for _, ids in examples for t in ids])
    target_lengths = torch.tensor([len(ids) for _, ids in examples])
    return features, lengths, targets, target_lengths


class _CTCHead(torch.nn.Module):
    """Cosine similarity to the fixed token embeddings (class c + 1) and to a learned blank (class 0)."""

    def __init__(self, token_embeddings: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", F.normalize(token_embeddings.float(), dim=-1))
        self.blank = torch.nn.Parameter(torch.randn(token_embeddings.shape[1]) * 0.02)
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        directions = F.normalize(frames, dim=-1)
        blank = directions @ F.normalize(self.blank, dim=0).unsqueeze(1)
        return self.scale * torch.cat([blank, directions @ self.table.T], dim=-1)


def greedy_ctc_decode(logits: torch.Tensor, length: int, vocab: list[int]) -> list[int]:
    """Best path: argmax per frame, repeats merged, blanks (class 0) dropped; class c + 1 is ``vocab[c]``."""
    out, previous = [], 0
    for c in logits[:length].argmax(-1).tolist():
        if c != previous and c != 0:
            out.append(vocab[c - 1])
        previous = c
    return out


def ctc_warmstart(
    perception: FeaturePerception,
    embeddings: torch.Tensor,
    examples: list[tuple[torch.Tensor, list[int]]],
    cfg: CTCWarmStartConfig,
    *,
    progress: bool = True,
) -> dict[str, float]:
    """Train ``perception`` (in place) with CTC on ``examples`` (features ``[frames, D]``, transcript token ids)
    against ``embeddings`` (the LLM's input embedding table), then match its output norm to the tokens'.

    Returns the last loss, the training transcripts decoded exactly (fraction) and the rescaling factor.
    """
    if not isinstance(perception.proj, torch.nn.Linear):
        raise ValueError("the CTC warm start rescales the perception's projection, but it has none (nn.Identity)")
    vocab = sorted({t for _, ids in examples for t in ids})
    too_long = [i for i, (f, ids) in enumerate(examples) if len(ids) > f.shape[0]]
    if too_long:
        raise ValueError(f"{len(too_long)} example(s) have more transcript tokens than frames (first: #{too_long[0]}); "
                         "CTC needs frames >= tokens: pool the encoder features less")
    classes = {t: i + 1 for i, t in enumerate(vocab)}
    head = _CTCHead(embeddings[vocab])
    generator = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    params = [p for p in perception.parameters()] + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    steps = range(cfg.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="ctc warm start", unit="step")
    perception.train()
    loss = torch.tensor(float("nan"))
    for step in steps:
        chosen = generator.sample(examples, min(cfg.batch_size, len(examples)))
        features, lengths, targets, target_lengths = _batch(chosen, classes)
        frames, frame_lengths = perception(features, lengths)
        log_probs = head(frames).log_softmax(-1).transpose(0, 1)
        loss = F.ctc_loss(log_probs, targets, frame_lengths, target_lengths, blank=0, zero_infinity=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress:
            steps.set_postfix(loss=f"{loss.item():.3f}")
        elif cfg.log_every and step % cfg.log_every == 0:
            log.info("ctc warm start step %d: loss %.4f", step, loss.item())
    perception.eval()
    exact, norms = 0, []
    with torch.no_grad():
        for start in range(0, len(examples), cfg.batch_size):
            chunk = examples[start : start + cfg.batch_size]
            features, lengths, _, _ = _batch(chunk, classes)
            frames, frame_lengths = perception(features, lengths)
            logits = head(frames)
            for i, (_, ids) in enumerate(chunk):
                n = int(frame_lengths[i])
                exact += greedy_ctc_decode(logits[i], n, vocab) == ids
                norms.append(frames[i, :n].norm(dim=-1))
        factor = float(embeddings[vocab].float().norm(dim=-1).mean() / torch.cat(norms).mean())
        perception.proj.weight.mul_(factor)
        if perception.proj.bias is not None:
            perception.proj.bias.mul_(factor)
    return {"loss": float(loss), "exact_transcripts": exact / len(examples), "scale": factor}
