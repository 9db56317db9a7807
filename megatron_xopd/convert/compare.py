"""Our megatron-core model against transformers on the same tokens: logits and greedy decoding.

What a user runs after every conversion (``tools/compare_logits.py``) and what the conversion tests call.
:func:`mcore_logits` runs a (sharded) GPT through megatron's own pipeline schedule, so it works under any
TP/PP/EP layout; the full-vocabulary logits end up on every rank. Greedy decoding on both sides recomputes the
whole sequence at each step (no KV cache), so the comparison checks the model, not two caches.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

GREEDY_TOKENS = 16
Logits = Callable[[torch.Tensor], torch.Tensor]  # ids [b, s] -> logits [b, s, vocab]


@dataclass
class Comparison:
    max_abs_diff: float
    mean_abs_diff: float
    greedy_equal: bool
    hf_tokens: list[int]
    mcore_tokens: list[int]
    prompt_tokens: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@torch.no_grad()
def mcore_logits(model: torch.nn.Module, ids: torch.Tensor, vocab_size: int, **forward_kwargs) -> torch.Tensor:
    """Logits ``[b, s, vocab_size]`` of ``ids`` on every rank (collective over TP, PP and EP); ``forward_kwargs``
    go to the model's forward (a speech student's ``audio``, ``audio_lens``)."""
    collected: list[torch.Tensor] = []
    length = ids.shape[1]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if getattr(model.config, "sequence_parallel", False) and length % tp:
        # sequence parallelism splits the sequence over TP: pad on the right (causal: no earlier logit changes)
        ids = torch.cat([ids, ids.new_zeros(ids.shape[0], tp - length % tp)], dim=1)
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)

    def forward_step(data_iterator, model):
        next(data_iterator)
        output = model(ids, positions, None, **forward_kwargs)

        def keep(out: torch.Tensor, non_loss_data: bool = False):
            collected.append(gather_from_tensor_model_parallel_region(out)[:, :length, :vocab_size].float().clone())
            return out.new_zeros(()), {}

        return output, keep

    model.eval()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=[model],
        num_microbatches=1,
        seq_length=ids.shape[1],
        micro_batch_size=ids.shape[0],
        forward_only=True,
    )
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return collected[0]
    stages: list[torch.Tensor | None] = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, collected[0] if collected else None, group=parallel_state.get_pipeline_model_parallel_group())
    return stages[-1]


@torch.no_grad()
def greedy(logits_fn: Logits, prompt: torch.Tensor, steps: int = GREEDY_TOKENS) -> list[int]:
    """``steps`` greedy tokens after ``prompt`` ``[1, s]``, recomputing the full sequence each step."""
    sequence = prompt
    for _ in range(steps):
        nxt = logits_fn(sequence)[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, nxt], dim=1)
    return sequence[0, prompt.shape[1]:].tolist()


def hf_model(hf_dir: str | Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def compare(hf_logits: Logits, ours: Logits, prompt: torch.Tensor, steps: int = GREEDY_TOKENS) -> Comparison:
    """Logit differences on ``prompt`` (``[1, s]``) and whether ``steps`` greedy tokens agree.

    ``ours`` is collective under model parallelism: every rank calls this, with the same prompt.
    """
    with torch.no_grad():
        ref = hf_logits(prompt).float()
        got = ours(prompt).float()
    if ref.shape != got.shape:
        raise ValueError(f"logit shapes differ: transformers {tuple(ref.shape)}, megatron {tuple(got.shape)}")
    diff = (got - ref).abs()
    hf_tokens, mcore_tokens = greedy(hf_logits, prompt, steps), greedy(ours, prompt, steps)
    return Comparison(
        max_abs_diff=diff.max().item(),
        mean_abs_diff=diff.mean().item(),
        greedy_equal=hf_tokens == mcore_tokens,
        hf_tokens=hf_tokens,
        mcore_tokens=mcore_tokens,
        prompt_tokens=prompt.shape[1],
    )


def prompt_ids(tokenizer_dir: str | Path | None, text: str | None, vocab_size: int) -> torch.Tensor:
    """The prompt as ``[1, s]`` ids: ``text`` through the tokenizer in ``tokenizer_dir``; without a tokenizer, a
    fixed pseudo-random sequence of 12 ids (so models saved without one can still be compared)."""
    if tokenizer_dir is not None and text is not None:
        from transformers import AutoTokenizer

        directory = Path(tokenizer_dir)
        if (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file():
            return torch.tensor([AutoTokenizer.from_pretrained(str(directory))(text)["input_ids"]])
        raise FileNotFoundError(f"--prompt needs a tokenizer, and {directory} has none (tokenizer.json)")
    return torch.randint(0, vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))


def read_wav(path: str | Path, sampling_rate: int = 16000) -> torch.Tensor:
    """A mono float32 waveform ``[samples]`` at ``sampling_rate`` (lhotse reads and resamples)."""
    from lhotse import Recording

    audio = Recording.from_file(str(path)).resample(sampling_rate).load_audio()
    return torch.from_numpy(audio.mean(axis=0)).float()


def omni_thinker(hf_dir: str | Path) -> torch.nn.Module:
    """transformers' thinker of a Qwen3-Omni directory (the full model's ``.thinker``, or a thinker saved alone)."""
    from transformers import Qwen3OmniMoeForConditionalGeneration, Qwen3OmniMoeThinkerForConditionalGeneration

    from .qwen3_omni import read_omni

    if read_omni(hf_dir).prefix:
        return Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).thinker.eval()
    return Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def compare_omni(hf_dir: str | Path, student: torch.nn.Module, meta: dict, wav: str | Path | None,
                 text_ids: torch.Tensor) -> Comparison:
    """The Qwen3-Omni student against transformers' thinker on one spoken prompt (collective, every rank calls it).

    The prompt is ``<|audio_start|>`` + one ``<|audio_pad|>`` per tower output of ``wav`` + ``<|audio_end|>`` +
    ``text_ids`` (the processor's audio layout); without ``wav``, ``text_ids`` alone. transformers gets the log-mel
    of the HF directory's feature extractor, the student the waveform (its tower makes its own log-mel).
    """
    from transformers import WhisperFeatureExtractor

    from ..models.qwen3_omni import audio_output_lengths, omni_log_mel
    from .qwen3_omni import read_omni

    thinker_cfg = read_omni(hf_dir).thinker_config
    hf = omni_thinker(hf_dir)
    vocab = student.llm_cfg.vocab_size
    if wav is None:
        return compare(lambda ids: hf(input_ids=ids).logits[..., :vocab],
                       lambda ids: mcore_logits(student, ids, vocab), text_ids)
    wave = read_wav(wav)
    if (Path(hf_dir) / "preprocessor_config.json").is_file():
        extractor = WhisperFeatureExtractor.from_pretrained(str(hf_dir))
    else:
        extractor = WhisperFeatureExtractor(feature_size=int(thinker_cfg["audio_config"].get("num_mel_bins", 128)))
    mel, frames = omni_log_mel(extractor, [wave.numpy()])
    tokens = int(audio_output_lengths(frames, int(meta.get("n_window", 50)))[0])
    audio_ids = [int(thinker_cfg["audio_start_token_id"])] + [int(meta["audio_token_id"])] * tokens + \
        [int(thinker_cfg["audio_end_token_id"])]
    prompt = torch.cat([torch.tensor([audio_ids]), text_ids], dim=1)
    features, mask = mel.transpose(1, 2), torch.ones(1, mel.shape[1], dtype=torch.long)

    def hf_logits(ids: torch.Tensor) -> torch.Tensor:
        return hf(input_ids=ids, input_features=features, feature_attention_mask=mask).logits[..., :vocab]

    audio, audio_lens = wave[None], torch.tensor([wave.shape[0]])
    return compare(hf_logits, lambda ids: mcore_logits(student, ids, vocab, audio=audio, audio_lens=audio_lens), prompt)
