"""Cache the Qwen3-Omni thinker's audio-tower outputs: what a ``perception.source=features`` student splices.

The tower is the frozen one of a directory ``tools/convert_qwen3_omni_to_mcore.py`` wrote (its
``perception.safetensors``, ``perception_config.yaml``, and the HF directory's ``preprocessor_config.json``);
each cut's 16 kHz audio becomes log-mel exactly as ``Qwen3OmniMoeProcessor`` makes it (one audio at a time,
:func:`~megatron_xopd.models.qwen3_omni.omni_log_mel`), the tower's output ``[tokens, hidden]`` (as many rows as the
processor puts ``<|audio_pad|>`` tokens in the prompt) is stored unpooled as the cut's ``encoder_features``, by
:func:`~megatron_xopd.prep.encoder_features.cache_cut_features` (resumable, data-parallel over ranks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lhotse.cut import Cut

from ..data.cuts import BadCutError, load_audio
from ..models.qwen3_omni import Qwen3OmniAudioPerception, omni_log_mel
from .encoder_features import SAMPLING_RATE, cache_cut_features

class OmniAudioTower:
    """The frozen audio tower of a converted Qwen3-Omni student, on 16 kHz mono waveforms."""

    def __init__(self, student_dir: str | Path, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        from ..convert.qwen3_omni import PERCEPTION_WEIGHTS, load_omni_perception, load_omni_student_configs

        self.student_dir = Path(student_dir)
        _, cfg, _ = load_omni_student_configs(self.student_dir, "audio")
        self.perception = Qwen3OmniAudioPerception(cfg, int(cfg.audio_config.get("output_dim", 0)))
        load_omni_perception(self.perception, self.student_dir / PERCEPTION_WEIGHTS)
        self.perception.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def encode(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        """The tower's outputs, float32 ``[tokens, hidden]`` per waveform."""
        mel, lens = omni_log_mel(self.perception.feature_extractor, waveforms)
        out, out_lens = self.perception(mel.to(self.device, self.dtype), lens.to(self.device))
        return [out[i, : int(n)].float().cpu().numpy() for i, n in enumerate(out_lens)]


def tower_cut_audio(cut: Cut) -> np.ndarray:
    """A cut's 16 kHz mono audio; no audio, or none to encode, is a :class:`BadCutError` naming the cut."""
    audio = load_audio(cut, SAMPLING_RATE)
    if audio.shape[0] < 160:  # under one mel frame: the tower emits nothing
        raise BadCutError(cut.id, "recording", f"{audio.shape[0]} samples of audio: under one 10 ms mel frame")
    return audio


def tower_frame_shift(cut: Cut, rows: np.ndarray) -> float:
    """The cut's duration over its rows: the tower emits 13 rows per 100 mel frames and fewer for a last partial
    chunk, so no fixed shift makes lhotse's ``load_custom`` (``round(duration / frame_shift)`` rows) return all."""
    return cut.duration / rows.shape[0]


def cache_audio_tower_features(
    student_dir: str | Path, cuts_path: str | Path, out_manifest: str | Path, storage_dir: str | Path, *,
    batch_size: int = 8, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    on_bad_cut: Literal["raise", "skip"] = "raise", progress: bool = True, rank: int = 0, world_size: int = 1,
    barrier: Any = None,
) -> Path:
    """Every cut of ``cuts_path`` with its tower outputs as ``encoder_features``, written to ``out_manifest``;
    the tower is only built if some cut still needs encoding."""
    tower: list[OmniAudioTower] = []

    def encode(waves: list[np.ndarray]) -> list[np.ndarray]:
        if not tower:
            tower.append(OmniAudioTower(student_dir, device=device, dtype=dtype))
        return tower[0].encode(waves)

    settings = {"encoder": "qwen3_omni_audio_tower", "student": str(Path(student_dir).resolve()),
                "dtype": str(dtype).removeprefix("torch."), "storage_dir": str(Path(storage_dir).resolve())}
    return cache_cut_features(cuts_path, out_manifest, storage_dir, encode, settings=settings,
                              frame_shift=tower_frame_shift, cut_audio=tower_cut_audio, batch_size=batch_size,
                              on_bad_cut=on_bad_cut, progress=progress, rank=rank, world_size=world_size,
                              barrier=barrier)
