"""NeMo data configs, verbatim, through the trainer's data path (``load_prompt_cuts`` -> ``PairedPromptDataset`` ->
``build_dataloader``), read by NeMo's own ``read_cutset_from_config``: a JSON manifest, an ``input_cfg`` blend
weighted 3:1, a tarred manifest, a Lhotse Shar source, a multimodal conversation manifest, and bad lines."""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet

from megatron_xopd.data.cuts import BadCutError, load_prompt_cuts
from megatron_xopd.data.dataset import PairedPromptDataset, build_dataloader
from megatron_xopd.data.nemo_config import BadManifestEntry
from megatron_xopd.trainer.config import to_run_config
from tests._tokenizers import byte_tokenizer

SR = 16000


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return byte_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def wave(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.1 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_nemo_manifest(root: Path, prefix: str, n: int, *, relative: bool = True, sampling_rate: bool = False) -> Path:
    """``n`` short WAVs and a NeMo JSON manifest (relative audio paths, as NeMo resolves them) of them; with
    ``sampling_rate`` NeMo's reader need not open each file for its header (faster for long streams)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        audio = wave(0.1 + 0.02 * (i % 4), 200 + 20 * i)
        sf.write(root / f"{prefix}_{i}.wav", audio, SR)
        path = f"{prefix}_{i}.wav" if relative else str(root / f"{prefix}_{i}.wav")
        lines.append({"audio_filepath": path, "duration": len(audio) / SR, "text": f"{prefix} number {i}",
                      **({"sampling_rate": SR} if sampling_rate else {})})
    manifest = root / f"{prefix}_manifest.json"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def batches(cfg, tokenizer, *, finite: bool = False, max_cuts: int = 4, on_bad_cut: str = "skip", seed: int = 0):
    cuts = load_prompt_cuts(cfg, seed=seed, finite=finite, on_bad_cut=on_bad_cut)
    dataset = PairedPromptDataset(tokenizer, speech_input="audio", on_bad_cut=on_bad_cut)
    loader = build_dataloader(cuts, dataset, max_cuts=max_cuts, seed=seed, num_buckets=2)
    loader.set_epoch(0)
    return iter(loader)


def test_nemo_manifest_gives_audio_and_transcript_pairs(tmp_path, tokenizer):
    manifest = write_nemo_manifest(tmp_path / "asr", "a", 6)
    cfg = {"manifest_filepath": str(manifest)}
    seen = {}
    for batch in batches(cfg, tokenizer, finite=True):
        for row, cut_id in enumerate(batch["cut_ids"]):
            seen[Path(cut_id).stem] = (batch["text_prompts"][row], batch["audio"][row, : batch["audio_lens"][row]])
    assert sorted(seen) == [f"a_{i}" for i in range(6)]  # each entry once: validation data is finite
    for i in range(6):
        text, audio = seen[f"a_{i}"]
        assert text == f"a number {i}"  # T = the transcript
        want, _ = sf.read(tmp_path / "asr" / f"a_{i}.wav", dtype="float32")
        np.testing.assert_allclose(audio.numpy(), want, atol=1e-4)  # S = the audio


def test_input_cfg_blend_is_sampled_three_to_one(tmp_path, tokenizer):
    """Two NeMo manifests weighted 3:1: over 400 sampled cuts the share of the first is 0.75 +- 0.06 (the
    binomial standard deviation is 0.022; the seed is fixed, so this is deterministic)."""
    a = write_nemo_manifest(tmp_path / "a", "a", 8, sampling_rate=True)
    b = write_nemo_manifest(tmp_path / "b", "b", 8, sampling_rate=True)
    cfg = {"input_cfg": [{"type": "nemo", "manifest_filepath": str(a), "weight": 3.0, "tags": {"src": "a"}},
                         {"type": "nemo", "manifest_filepath": str(b), "weight": 1.0, "tags": {"src": "b"}}]}
    names, texts = [], {}
    it = batches(cfg, tokenizer, max_cuts=8)
    while len(names) < 400:
        batch = next(it)  # the blend repeats its sources forever, as in NeMo
        for cut_id, text in zip(batch["cut_ids"], batch["text_prompts"]):
            names.append(Path(cut_id).stem)
            texts[Path(cut_id).stem] = text
    share_a = sum(name.startswith("a_") for name in names[:400]) / 400
    assert 0.69 <= share_a <= 0.81, share_a
    assert texts["b_3"] == "b number 3" and texts["a_5"] == "a number 5"


def test_blend_is_the_same_stream_on_every_rank_and_rerun(tmp_path, tokenizer):
    """shard_seed defaults to the run's seed: two readers (two DP ranks, or a resumed run) see one stream."""
    a = write_nemo_manifest(tmp_path / "a", "a", 5)
    b = write_nemo_manifest(tmp_path / "b", "b", 5)
    cfg = {"input_cfg": [{"type": "nemo", "manifest_filepath": str(a), "weight": 1},
                         {"type": "nemo", "manifest_filepath": str(b), "weight": 1}]}
    first = [c.id for c in load_prompt_cuts(cfg, seed=3).subset(first=40)]
    again = [c.id for c in load_prompt_cuts(cfg, seed=3).subset(first=40)]
    other = [c.id for c in load_prompt_cuts(cfg, seed=4).subset(first=40)]
    assert first == again and first != other


def write_tarred(root: Path, n: int) -> tuple[Path, Path]:
    """A NeMo tarred manifest (basenames) and its tar of WAVs."""
    plain = write_nemo_manifest(root / "plain", "t", n)
    tar_path = root / "audio_0.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(n):
            tar.add(root / "plain" / f"t_{i}.wav", arcname=f"t_{i}.wav")
    manifest = root / "tarred_manifest_0.json"
    lines = [json.loads(line) for line in plain.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({**line, "shard_id": 0}) + "\n" for line in lines))
    return manifest, tar_path


def test_tarred_manifest_and_shar_source_load(tmp_path, tokenizer):
    manifest, tar_path = write_tarred(tmp_path / "tarred", 4)
    cfg = {"manifest_filepath": str(manifest), "tarred_audio_filepaths": str(tar_path)}
    batch = next(batches(cfg, tokenizer, finite=True, max_cuts=4))
    assert sorted(batch["cut_ids"]) == [f"t_{i}.wav" for i in range(4)]
    for row, cut_id in enumerate(batch["cut_ids"]):
        i = int(cut_id[2])
        assert batch["text_prompts"][row] == f"t number {i}"
        want, _ = sf.read(tmp_path / "tarred" / "plain" / cut_id, dtype="float32")
        np.testing.assert_allclose(batch["audio"][row, : batch["audio_lens"][row]].numpy(), want, atol=1e-4)

    # A Lhotse Shar source, as an input_cfg item (NeMo's ``lhotse_shar`` type), made from the same audio.
    shar_dir = tmp_path / "shar"
    shar_dir.mkdir()
    cuts = CutSet.from_cuts(c for c in load_prompt_cuts(cfg, finite=True))
    cuts.to_shar(shar_dir, fields={"recording": "wav"}, shard_size=2)
    shar_cfg = {"input_cfg": [{"type": "lhotse_shar", "shar_path": str(shar_dir)}], "force_finite": True}
    got = [(c, t) for b in batches(shar_cfg, tokenizer, max_cuts=4) for c, t in zip(b["cut_ids"], b["text_prompts"])]
    assert sorted(got) == [(f"t_{i}.wav", f"t number {i}") for i in range(4)]


def test_conversation_entries_give_user_audio_and_its_transcript(tmp_path, tokenizer):
    root = tmp_path / "conv"
    root.mkdir()
    lines = []
    for i in range(3):
        sf.write(root / f"c_{i}.wav", wave(0.15, 300 + 50 * i), SR)
        turns = [{"from": "User", "type": "audio", "value": str(root / f"c_{i}.wav"), "duration": 0.15},
                 {"from": "User", "type": "text", "value": f"what is {i} plus {i}"},  # the user message's text
                 {"from": "Assistant", "type": "text", "value": str(2 * i)}]
        lines.append({"id": f"conv{i}", "conversations": turns})
    lines.append({"id": "textonly", "conversations": [{"from": "User", "type": "text", "value": "hi"},
                                                      {"from": "Assistant", "type": "text", "value": "hello"}]})
    manifest = root / "conversations.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cfg = {"input_cfg": [{"type": "multimodal_conversation", "manifest_filepath": str(manifest),
                          "audio_locator_tag": "<|audio|>"}]}
    batch = next(batches(cfg, tokenizer, finite=True, max_cuts=8))
    assert sorted(zip(batch["text_prompts"], batch["answers"])) == [(f"what is {i} plus {i}", str(2 * i)) for i in range(3)]
    assert batch["audio"].shape[0] == 3 and int(batch["audio_lens"].max()) == int(0.15 * SR)
    stats = batch["stats"]
    assert stats.seen == 4 and stats.skipped == {"conversations": 1}  # the text-only conversation has no S
    with pytest.raises(BadCutError, match=rf"cut 'textonly' \(manifest {manifest}, line 4\), field 'conversations'"):
        next(batches(cfg, tokenizer, finite=True, max_cuts=8, on_bad_cut="raise"))


def test_bad_lines_are_skipped_with_manifest_and_line_named_or_raise(tmp_path, tokenizer):
    manifest = write_nemo_manifest(tmp_path / "bad", "x", 5)
    lines = manifest.read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "audio_filepath": "gone.wav"})  # line 2: no such audio
    lines[2] = json.dumps({**json.loads(lines[2]), "text": "  "})  # line 3: empty transcript
    lines[3] = "{not json"  # line 4
    manifest.write_text("\n".join(lines) + "\n")
    cfg = {"manifest_filepath": str(manifest)}

    got = [b for b in batches(cfg, tokenizer, finite=True, max_cuts=8)]
    ids = sorted(Path(c).stem for b in got for c in b["cut_ids"])
    assert ids == ["x_0", "x_4"]
    skipped = sum((b["stats"].skipped for b in got), Counter())
    assert skipped == {"supervisions[0].text": 1, "audio_filepath": 1, "line": 1}  # counted as data/skipped_*
    log = "\n".join(str(err) for b in got for err in b["stats"].errors)  # what the training loop logs
    assert f"(manifest {manifest}, line 2), field 'audio_filepath': audio file missing" in log
    assert f"(manifest {manifest}, line 4), field 'line': not JSON" in log
    assert f"(manifest {manifest}, line 3), field 'supervisions[0].text': empty prompt" in log

    with pytest.raises(BadManifestEntry, match=rf"manifest {manifest}, line 2, field 'audio_filepath'"):
        load_prompt_cuts(cfg, on_bad_cut="raise")
    lines[1], lines[3] = json.dumps({"audio_filepath": "x_1.wav", "duration": 0.12, "text": "ok"}), lines[0]
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadCutError, match=rf"\(manifest {manifest}, line 3\), field 'supervisions\[0\].text'"):
        list(batches(cfg, tokenizer, finite=True, max_cuts=8, on_bad_cut="raise"))


def test_run_config_takes_nemo_data_configs_verbatim():
    blend = {"input_cfg": [{"type": "nemo", "manifest_filepath": "a.json", "weight": 3},
                           {"type": "nemo_tarred", "manifest_filepath": "b_{0..1}.json",
                            "tarred_audio_filepaths": "b_{0..1}.tar", "weight": 1}], "shuffle": True}
    run = to_run_config({"data": {"train": blend, "validation": {"manifest_filepath": "dev.json"}}})
    assert run.data.train == blend and run.data.validation == {"manifest_filepath": "dev.json"}
    assert to_run_config({"data": {"train": "cuts.jsonl.gz"}}).data.train == "cuts.jsonl.gz"
