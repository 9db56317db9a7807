"""Each model's prompts in its own format (megatron_xopd/data/prompt_format.py): the Qwen3-Omni student's speech
prompt token for token as transformers' ``Qwen3OmniMoeProcessor`` builds it, the teacher's prompt by its own
tokenizer and chat template with its own options, clear errors for a teacher that does not share the student's text
vocabulary or end-of-turn token, and ``logging.samples`` through a short trainer run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from megatron_xopd.testing import run_distributed
from tests._omni_tokenizer import omni_processor, qwen_tokenizer
from tests._trainer_setup import PROMPTS, run_config, train, write_feature_cuts

if TYPE_CHECKING:
    from lhotse import CutSet

    from megatron_xopd.trainer import RunConfig

SYSTEM = "You are a helpful voice assistant."


def _feature_cuts(root: Path, texts: list[str], rows: list[int], dim: int = 8) -> CutSet:
    """Cuts carrying cached tower outputs of ``rows`` frames each (what the student splices per audio token)."""
    from lhotse import CutSet, MonoCut
    from lhotse.features.io import NumpyFilesWriter

    cuts = []
    with NumpyFilesWriter(str(root / "features")) as writer:
        for i, (text, n) in enumerate(zip(texts, rows)):
            cut = MonoCut(id=f"cut{i}", start=0.0, duration=n * 0.08, channel=0, custom={"text_prompt": text})
            cut.encoder_features = writer.store_array(cut.id, np.zeros((n, dim), np.float32), frame_shift=0.08,
                                                      temporal_dim=0)
            cuts.append(cut)
    return CutSet.from_cuts(cuts)


def test_qwen3_omni_speech_prompt_is_the_processors_token_for_token(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from megatron_xopd.data.dataset import PairedPromptDataset
    from megatron_xopd.data.prompt_format import ChatOptions, Qwen3OmniFormat, student_format
    from megatron_xopd.data.tokenizer import load_tokenizer
    from megatron_xopd.models.qwen3_omni import audio_output_lengths
    from megatron_xopd.models.speech import expand_audio_locators

    omni = qwen_tokenizer(tmp_path / "omni", omni=True)
    tokenizer = load_tokenizer(omni, audio_locator=None)
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(omni))  # no <|audio|> added to this family
    processor = omni_processor(omni, monkeypatch)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "audio", "audio": "speech.wav"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    rng = np.random.default_rng(0)
    waves = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (16000, 36_880)]  # 1 s; 2.3 s: 2 full chunks
    expected, mel_frames = [], []
    for wave in waves:
        out = processor(text=rendered, audio=[wave])
        expected.append(out["input_ids"][0])
        mel_frames.append(int(out["feature_attention_mask"].sum()))
    tower_frames = audio_output_lengths(torch.tensor(mel_frames)).tolist()  # the student's tower output length

    fmt = student_format(tokenizer, None, ChatOptions(system_prompt=SYSTEM))
    assert isinstance(fmt, Qwen3OmniFormat) and fmt.locator_id == tokenizer.audio_token_id
    cuts = _feature_cuts(tmp_path, ["What is 2 + 3?", "Name a colour."], tower_frames)
    batch = PairedPromptDataset(tokenizer, student=fmt, speech_input="features", on_bad_cut="raise")[cuts]
    for prompt, rows, want in zip(batch["speech_prompt_ids"], batch["feature_lens"].tolist(), expected):
        assert prompt.count(fmt.locator_id) == 1
        assert expand_audio_locators(prompt, rows, fmt.locator_id) == want
    assert expected[0].count(fmt.locator_id) == tower_frames[0] and tower_frames[0] != tower_frames[1]
    text = processor.apply_chat_template([messages[0], {"role": "user", "content": "What is 2 + 3?"}],
                                         add_generation_prompt=True, tokenize=False)
    assert batch["text_prompt_ids"][0] == processor(text=text)["input_ids"][0]
    assert batch["teacher_prompt_ids"] == batch["text_prompt_ids"]  # no teacher format given: the student's T

    with pytest.raises(ValueError, match=r"model.audio_locator='<\|audio\|>': a Qwen3-Omni tokenizer .*<\|audio_pad\|>"):
        student_format(tokenizer, "<|audio|>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # not Omni's layout
    with pytest.raises(ValueError, match="does not render an audio item as <.audio_start.><.audio_pad.><.audio_end.>"):
        student_format(tokenizer).speech_prompt()


def _config(tmp_path: Path, teacher_tokenizer: Path | None = None, **model) -> RunConfig:
    from megatron_xopd.trainer import to_run_config

    cfg = {"model": {"tokenizer": str(tmp_path / "omni"), **model}, "data": {"train": "unused"}}
    if teacher_tokenizer is not None:
        cfg["model"]["teacher_tokenizer"] = str(teacher_tokenizer)
    return to_run_config(cfg)


def test_teacher_prompt_is_its_own_templates_and_mismatches_are_clear_errors(tmp_path):
    from transformers import AutoTokenizer

    from megatron_xopd.data.dataset import PairedPromptDataset
    from megatron_xopd.models import ModelConfigError
    from megatron_xopd.trainer.build import load_prompts

    qwen_tokenizer(tmp_path / "omni", omni=True)
    teacher_dir = qwen_tokenizer(tmp_path / "teacher")
    options = {"student": {"system_prompt": SYSTEM},
               "teacher": {"system_prompt": "You are a teacher.", "chat_template_kwargs": {"enable_thinking": False}}}
    prompts = load_prompts(_config(tmp_path, teacher_dir, **options))
    teacher = AutoTokenizer.from_pretrained(teacher_dir)
    assert prompts.text_vocab_size == len(teacher)  # the Omni audio tokens come after the teacher's vocabulary
    text = "What is 2 + 3?"
    want = teacher.apply_chat_template([{"role": "system", "content": "You are a teacher."},
                                        {"role": "user", "content": text}],
                                       add_generation_prompt=True, enable_thinking=False)["input_ids"]
    assert prompts.teacher.text_prompt(text) == want and "</think>" in teacher.decode(want)
    cuts = _feature_cuts(tmp_path, [text], [3])
    batch = PairedPromptDataset(prompts.student.tokenizer, student=prompts.student, teacher=prompts.teacher,
                                speech_input="none")[cuts]
    assert batch["teacher_prompt_ids"] == [want]
    assert prompts.student.tokenizer.decode(batch["text_prompt_ids"][0]).startswith(f"<|im_start|>system\n{SYSTEM}")

    # the teacher's tokenizer from its checkpoint directory when model.teacher_tokenizer is unset
    mcore = qwen_tokenizer(tmp_path / "teacher_mcore", rename={"<|im_end|>": "<|eot|>"})
    with pytest.raises(ModelConfigError, match=r"end-of-turn token: model.tokenizer vs model.teacher.mcore_path=.*"
                                               r"student '<\|im_end\|>' \(id 2\), teacher '<\|eot\|>' \(id 2\)"):
        load_prompts(_config(tmp_path, teacher={"mcore_path": str(mcore)}))
    swapped = qwen_tokenizer(tmp_path / "swapped", swap=(10, 11))
    with pytest.raises(ModelConfigError, match=r"unequal vocab: model.tokenizer vs model.teacher_tokenizer=.*"
                                               r"2 ids differ\): id 17: student '.' vs teacher '.'; id 18"):
        load_prompts(_config(tmp_path, swapped))


def _samples(cfg: dict) -> list[dict]:
    train(cfg)
    path = Path(cfg["logging"]["dir"]) / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_samples_jsonl_holds_readable_rollouts_with_each_models_prompt(tmp_path):
    from megatron_xopd.convert.sources import resolve_path
    from megatron_xopd.data.tokenizer import load_tokenizer

    manifest = write_feature_cuts(tmp_path, frames=4)
    teacher_system = "You are a careful teacher."
    cfg = run_config(tmp_path / "run", manifest, trainer={"max_steps": 2}, logging={"samples": 3},
                     model={"teacher": {"system_prompt": teacher_system}})
    samples = run_distributed(_samples, 1, cfg)[0]
    assert [s["step"] for s in samples] == [1, 1, 1, 2, 2, 2]
    assert [s["modality"] for s in samples[:3]] == ["speech", "text", "speech"]  # alternating
    tokenizer = load_tokenizer(resolve_path("builtin:smollm2"))
    locator = tokenizer.convert_tokens_to_ids("<|audio|>")
    teacher_prompts = [tokenizer.apply_chat_template([{"role": "system", "content": teacher_system},
                                                      {"role": "user", "content": p}],
                                                     add_generation_prompt=True)["input_ids"] for p in PROMPTS]
    for sample in samples:
        assert set(sample) == {"step", "modality", "prompt_ids", "teacher_prompt_ids", "response_ids", "response_text"}
        assert sample["teacher_prompt_ids"] in teacher_prompts  # the teacher's own system prompt
        assert sample["response_text"] == tokenizer.decode(sample["response_ids"]) and sample["response_ids"]
        frames = sample["prompt_ids"].count(locator)
        if sample["modality"] == "speech":  # the audio as the student saw it: one locator id per feature row
            assert frames in (4, 5, 6)
            assert tokenizer.decode(sample["prompt_ids"]).endswith("<|im_end|>\n<|im_start|>assistant\n")
        else:
            assert frames == 0 and sample["prompt_ids"] != sample["teacher_prompt_ids"]
