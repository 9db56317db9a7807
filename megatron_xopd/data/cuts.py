"""Paired speech/text prompts as a lhotse ``CutSet``.

Conventions for a prompt cut (a ``MonoCut``):

* **text prompt T**: ``cut.custom["text_prompt"]``, or else the text of the first supervision (so a plain
  ASR-style manifest, whose transcript *is* the prompt, works unchanged);
* **answer** (optional, for scoring): ``cut.custom["answer"]``;
* **reference response** (optional, what ``xopd.responses=reference`` trains on): ``cut.custom["response"]``,
  else the answer;
* **speech prompt S**: the cut's audio (``cut.recording``), or cached encoder outputs in the custom
  ``TemporalArray`` field ``encoder_features`` with shape ``[frames, dim]`` (``temporal_dim=0``), written e.g.
  with ``cut.encoder_features = writer.store_array(cut.id, array, frame_shift=..., temporal_dim=0)``.
  Cached encoder outputs are not acoustic input features, so lhotse's ``cut.features`` slot is left alone.

A cut that cannot be used raises :class:`BadCutError`, which names the cut id and the field; the dataset
either re-raises it or skips the cut and counts it in :class:`CutStats`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lhotse import CutSet
from lhotse.audio.utils import AudioLoadingError, DurationMismatchError
from lhotse.cut import Cut

ENCODER_FEATURES_FIELD = "encoder_features"
BAD_ENTRY_FIELD = "bad_entry"  # custom field {"field", "reason"} of an entry a reader could not map to a pair


class BadCutError(ValueError):
    """A cut that cannot be turned into a training example (``origin``: e.g. the manifest and line it came from)."""

    def __init__(self, cut_id: str, field: str, reason: str, origin: str | None = None) -> None:
        where = f" ({origin})" if origin else ""
        super().__init__(f"cut {cut_id!r}{where}, field {field!r}: {reason}")
        self.cut_id = cut_id
        self.field = field
        self.reason = reason
        self.origin = origin


@dataclass
class CutStats:
    """Counts of cuts seen and skipped (by field); ``as_dict()`` gives scalars for a logger.

    A skipped cut is counted once, however many epochs draw it again (``skipped_ids``); ``errors`` lists the
    skips recorded here, for the caller to log."""

    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_ids: set[str] = field(default_factory=set)
    errors: list[BadCutError] = field(default_factory=list)

    def record_skip(self, error: BadCutError) -> bool:
        """Count a skipped cut; False (not counted again) when this cut was already skipped."""
        if error.cut_id in self.skipped_ids:
            return False
        self.skipped_ids.add(error.cut_id)
        self.skipped[error.field] += 1
        self.errors.append(error)
        return True

    def update(self, other: CutStats) -> list[BadCutError]:
        """Add another stats object (e.g. the per-batch one carried out of a dataloader worker); returns the
        skips that are new here."""
        self.seen += other.seen
        return [err for err in other.errors if self.record_skip(err)]

    def as_dict(self, prefix: str = "data/") -> dict[str, int]:
        out = {f"{prefix}cuts_seen": self.seen, f"{prefix}cuts_skipped": sum(self.skipped.values())}
        out.update({f"{prefix}skipped_{name}": count for name, count in sorted(self.skipped.items())})
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-able counts (the logged errors are not kept)."""
        return {"seen": self.seen, "skipped": dict(self.skipped), "skipped_ids": sorted(self.skipped_ids)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CutStats:
        return cls(seen=int(state["seen"]), skipped=Counter(state["skipped"]), skipped_ids=set(state["skipped_ids"]))


def load_prompt_cuts(path_or_cfg: str | Path | Mapping[str, Any], *, seed: int = 0, finite: bool = False,
                     on_bad_cut: str = "skip") -> CutSet:
    """Open a prompt ``CutSet`` lazily.

    Accepts a path to a ``.jsonl``/``.jsonl.gz`` cut manifest or to a Lhotse Shar directory, or a config with
    NeMo's keys: ``cuts_path`` (manifest), or ``shar_path`` (a Shar directory, or a mapping of field name to
    shard list as in ``CutSet.from_shar(fields=...)``) with optional ``shuffle_shards`` and ``seed``. A NeMo
    dataloader config (``input_cfg`` or ``manifest_filepath``) goes to NeMo's reader through
    :func:`.nemo_config.read_nemo_cuts` (``seed``, ``finite``, ``on_bad_cut`` are for it).
    """
    from .nemo_config import is_nemo_config, read_nemo_cuts

    if is_nemo_config(path_or_cfg):
        return read_nemo_cuts(path_or_cfg, seed=seed, finite=finite, on_bad_cut=on_bad_cut)
    if isinstance(path_or_cfg, Mapping):
        cfg = dict(path_or_cfg)
        if cfg.get("cuts_path"):
            return CutSet.from_file(cfg["cuts_path"])
        shar = cfg.get("shar_path")
        if not shar:
            raise ValueError(f"prompt data config needs 'cuts_path' or 'shar_path', got keys {sorted(cfg)}")
        shard_opts = {"shuffle_shards": bool(cfg.get("shuffle_shards", False)), "seed": cfg.get("seed", 42)}
        if isinstance(shar, Mapping):
            return CutSet.from_shar(fields={k: list(v) for k, v in shar.items()}, **shard_opts)
        return CutSet.from_shar(in_dir=shar, **shard_opts)
    path = Path(path_or_cfg)
    if path.is_dir():
        return CutSet.from_shar(in_dir=path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt manifest not found: {path}")
    return CutSet.from_file(path)


def check_entry(cut: Cut) -> None:
    """Raise the :class:`BadCutError` a reader marked this cut with (``custom[BAD_ENTRY_FIELD]``), if any."""
    bad = (cut.custom or {}).get(BAD_ENTRY_FIELD)
    if bad is not None:
        raise BadCutError(cut.id, bad["field"], bad["reason"], origin=bad.get("origin"))


def text_prompt(cut: Cut) -> str:
    """The text prompt T of a cut (see the module docstring); an empty one is a :class:`BadCutError`."""
    custom = cut.custom or {}
    if "text_prompt" in custom:
        name, text = "text_prompt", custom["text_prompt"]
    elif cut.supervisions:
        name, text = "supervisions[0].text", cut.supervisions[0].text
    else:
        raise BadCutError(cut.id, "text_prompt", "no custom 'text_prompt' and no supervision to take it from")
    if not isinstance(text, str) or not text.strip():
        raise BadCutError(cut.id, name, f"empty prompt ({text!r})")
    return text


def answer(cut: Cut) -> str | None:
    """The optional reference answer (``cut.custom["answer"]``)."""
    value = (cut.custom or {}).get("answer")
    return None if value is None else str(value)


def reference_response(cut: Cut) -> str | None:
    """The response to train on with ``xopd.responses=reference``: ``custom["response"]``, else the answer."""
    value = (cut.custom or {}).get("response")
    return answer(cut) if value is None else str(value)


def load_audio(cut: Cut, sampling_rate: int = 16000) -> np.ndarray:
    """Mono float32 audio ``[samples]`` at ``sampling_rate``; missing or undecodable audio is a :class:`BadCutError`."""
    if not cut.has_recording:
        raise BadCutError(cut.id, "recording", "cut has no recording (audio expected)")
    for source in cut.recording.sources:
        if source.type == "file" and not Path(source.source).is_file():
            raise BadCutError(cut.id, "recording", f"audio file missing: {source.source}")
    try:
        audio = cut.resample(sampling_rate).load_audio()
    except (AudioLoadingError, DurationMismatchError, OSError) as err:
        raise BadCutError(cut.id, "recording", f"corrupt audio: {str(err).splitlines()[0]}") from err
    return audio.mean(axis=0, dtype=np.float32)


def load_encoder_features(cut: Cut) -> np.ndarray:
    """Cached encoder outputs ``[frames, dim]`` from the ``encoder_features`` custom field."""
    if not cut.has_custom(ENCODER_FEATURES_FIELD):
        raise BadCutError(cut.id, ENCODER_FEATURES_FIELD, "cut has no cached encoder features")
    try:
        feats = cut.load_custom(ENCODER_FEATURES_FIELD)
    except (OSError, ValueError) as err:
        raise BadCutError(cut.id, ENCODER_FEATURES_FIELD, f"cannot load: {err}") from err
    if feats.ndim != 2:
        raise BadCutError(cut.id, ENCODER_FEATURES_FIELD, f"expected [frames, dim], got shape {feats.shape}")
    return feats.astype(np.float32, copy=False)
