"""Prompt records -> spoken, feature-cached paired prompt splits (the data of the quickstart and the study).

For each split: the text prompts are written as JSONL, spoken with the TTS of :mod:`.synthesis` (optionally
ASR-filtered), and their frozen Whisper encoder outputs cached by :mod:`.encoder_features`. Layout per split::

    OUT_DIR/<split>_features.jsonl.gz   the cuts with ``encoder_features`` (and audio): what training reads
    OUT_DIR/<split>/prompts.jsonl       the text prompts, answers and metadata
    OUT_DIR/<split>/wavs/               16 kHz speech prompts
    OUT_DIR/<split>/cuts_audio.jsonl.gz the synthesised cuts (no features)
    OUT_DIR/<split>/features/           cached encoder outputs (.npy)

Everything is resumable: a rerun reuses finished WAV and feature files and writes no partial file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .encoder_features import WhisperEncoder, cache_encoder_features
from .reasoning_gym_prompts import write_prompts_jsonl
from .synthesis import ESPEAK, SynthesisConfig, read_prompt_items, synthesize

ESPEAK_MISSING = "espeak-ng is not installed; the prompts are spoken with it: apt-get install espeak-ng"


def prepare_feature_splits(
    splits: dict[str, list[dict[str, Any]]],
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_wer: float | None = None,
    snr_db_range: tuple[float, float] | None = None,
    pool: int = 4,
    compute_type: str = "float32",
    num_threads: int = 0,
    encoder: WhisperEncoder | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Speak and encode each split's prompt records; returns ``{split: features manifest}``.

    ``max_wer`` switches on the Whisper ASR filter (a split may come out smaller); ``encoder`` (default: Whisper
    base with ``compute_type`` on ``num_threads`` CPU threads, 0: CTranslate2's default) makes the features.
    """
    if shutil.which(ESPEAK) is None:
        raise RuntimeError(ESPEAK_MISSING)
    out_dir = Path(out_dir)
    if encoder is None:
        encoder = WhisperEncoder(compute_type=compute_type, num_threads=num_threads)  # loads only when needed
    manifests: dict[str, Path] = {}
    for split, records in splits.items():
        split_dir = out_dir / split
        prompts = split_dir / "prompts.jsonl"
        write_prompts_jsonl(records, prompts)
        cfg = SynthesisConfig(out_dir=split_dir, manifest=split_dir / "cuts_audio.jsonl.gz", seed=seed,
                              max_wer=max_wer, snr_db_range=snr_db_range)
        synthesize(read_prompt_items(prompts), cfg, progress=progress)
        manifests[split] = cache_encoder_features(cfg.manifest, out_dir / f"{split}_features.jsonl.gz",
                                                  split_dir / "features", pool=pool, encoder=encoder,
                                                  progress=progress)
    return manifests
