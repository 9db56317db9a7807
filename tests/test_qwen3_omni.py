"""The Qwen3-Omni thinker as our speech student, against transformers' ``Qwen3OmniMoeThinkerForConditionalGeneration``.

A tiny random thinker (2-layer MoE LLM with 6 experts, 2-layer audio tower, tiny vision tower) is built offline
from a config dict in float32. The student's logits on an audio+text prompt (random 128-bin mel features through
the frozen tower, or the tower's cached outputs) must match transformers within 1e-4; the export back into the
original directory must give transformers the same logits; the conversion CLI runs end to end. The trainer's build
path (build_models on the converted directory) from waveforms and from cached tower outputs, at TP=1 and EP=2, the
tower-output cache tool (vs get_audio_features within 1e-5) and compare_logits.py --audio are checked the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from megatron_xopd.testing import run_distributed

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 160
AUDIO, AUDIO_START, AUDIO_END = 150, 151, 152
MEL_FRAMES = (130, 110)  # one full 100-frame chunk + a partial one: 17 and 15 audio tokens
ATOL = 1e-4


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and not name.startswith(("audio_tower", "model.audio_tower")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):  # router: spread logits so top-k has clear winners
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def thinker_config() -> dict:
    return dict(
        architectures=["Qwen3OmniMoeThinkerForConditionalGeneration"],
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                          output_dim=32, n_window=50, n_window_infer=100, downsample_hidden_size=8,
                          max_source_positions=64),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                           deepstack_visual_indexes=[0], patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6,
                         num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                             "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
        audio_token_id=AUDIO, audio_start_token_id=AUDIO_START, audio_end_token_id=AUDIO_END, image_token_id=153,
        video_token_id=154, vision_start_token_id=155,
    )


def make_thinker(path: Path, seed: int = 0) -> Path:
    """The thinker with what a Qwen3-Omni directory ships beside it: a tokenizer (ids 0-149 text, the audio tokens at
    their config ids) and the processor's feature extractor (WhisperFeatureExtractor, 128 mel bins)."""
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration, WhisperFeatureExtractor

    model = Qwen3OmniMoeThinkerForConditionalGeneration(Qwen3OmniMoeThinkerConfig(**thinker_config())).float()
    _randomize(model, seed)
    model.save_pretrained(str(path))
    omni_tokenizer(path)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(str(path))
    return path


def omni_tokenizer(path: Path) -> None:
    """A word-level tokenizer with the thinker's special-token layout: text ids below 150, <|audio_pad|> = 150,
    <|audio_start|> = 151, <|audio_end|> = 152."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {AUDIO: "<|audio_pad|>", AUDIO_START: "<|audio_start|>", AUDIO_END: "<|audio_end|>"}
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, **{f"w{i}": i for i in range(3, AUDIO)},
             **{tok: i for i, tok in specials.items()}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", *specials.values()])
    fast.save_pretrained(str(path))


def waveforms() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 16 kHz 'spoken prompts' ([2, samples] zero-padded, lengths) of MEL_FRAMES log-mel frames."""
    g = torch.Generator().manual_seed(11)
    lens = torch.tensor(MEL_FRAMES) * 160
    waves = 0.1 * torch.randn(2, int(lens.max()), generator=g)
    for i, n in enumerate(lens.tolist()):
        waves[i, n:] = 0
    return waves, lens


def processor_mel(path: Path, waves: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel of each audio as Qwen3OmniMoeProcessor makes it for a one-audio prompt (its audio kwargs), padded."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor.from_pretrained(str(path))
    mels = []
    for wave, n in zip(waves, lens.tolist()):
        out = fe(wave[:n].numpy(), sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
                 return_tensors="pt")
        mels.append(out["input_features"][0].transpose(0, 1)[: int(out["attention_mask"].sum())])
    return torch.nn.utils.rnn.pad_sequence(mels, batch_first=True), torch.tensor([m.shape[0] for m in mels])


def prompts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [2, S], mel [2, frames, 128] zero-padded, mel lengths): text, audio start, audio tokens, audio end, text;
    the shorter row is right-padded with text ids so both rows have S tokens."""
    from megatron_xopd.models.qwen3_omni import audio_output_lengths

    g = torch.Generator().manual_seed(7)
    lens = torch.tensor(MEL_FRAMES)
    tokens = audio_output_lengths(lens).tolist()
    rows = [[3, 9, AUDIO_START] + [AUDIO] * n + [AUDIO_END] + torch.randint(0, 140, (5,), generator=g).tolist()
            for n in tokens]
    width = max(map(len, rows))
    ids = torch.tensor([r + torch.randint(0, 140, (width - len(r),), generator=g).tolist() for r in rows])
    mel = torch.randn(2, max(MEL_FRAMES), 128, generator=g)
    for i, n in enumerate(MEL_FRAMES):
        mel[i, n:] = 0
    return ids, mel, lens


def hf_thinker(path: Path):
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    return Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(path: Path, ids: torch.Tensor, mel: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    model = hf_thinker(path)
    mask = (torch.arange(mel.shape[1]) < lens[:, None]).long()
    out = model(input_ids=ids, input_features=mel.transpose(1, 2), feature_attention_mask=mask,
                attention_mask=torch.ones_like(ids))
    return out.logits


# --------------------------------------------------------------------------------------------- ranks


def _student_logits(model, ids: torch.Tensor, **audio) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    with torch.no_grad():
        out = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None, **audio)
    return gather_from_tensor_model_parallel_region(out)[..., :VOCAB].clone()


def _convert_and_run(hf: str, work: str, ids: torch.Tensor, mel: torch.Tensor, lens: torch.Tensor) -> dict:
    """TP=1: convert with the tower (audio) and without (features), run both, export back."""
    from megatron_xopd.convert.qwen3_omni import (
        build_omni_student_from_mcore,
        convert_qwen3_omni_to_mcore,
        export_mcore_student_to_qwen3_omni,
    )
    from megatron_xopd.runtime import set_seed

    convert_qwen3_omni_to_mcore(hf, f"{work}/audio")
    convert_qwen3_omni_to_mcore(hf, f"{work}/features", perception_source="features")
    set_seed(0)
    student, meta = build_omni_student_from_mcore(f"{work}/audio")
    out = {"audio": _student_logits(student, ids, audio=mel, audio_lens=lens), "meta": meta,
           "frozen": not any(p.requires_grad for p in student.perception.parameters()),
           "trainable_llm": all(p.requires_grad for p in student.language_model.parameters())}
    with torch.no_grad():
        cached = student.perception(mel, lens)  # the tower's outputs: what tools/cache_audio_features.py stores
    set_seed(0)
    features, _ = build_omni_student_from_mcore(f"{work}/features")
    out["features_params"] = sum(p.numel() for p in features.perception.parameters())
    out["features"] = _student_logits(features, ids, audio=cached[0], audio_lens=cached[1])
    export_mcore_student_to_qwen3_omni(f"{work}/audio", hf, f"{work}/export")
    # a trainer step checkpoint ({"model": the whole student}) exports with --meta-dir the converted directory
    from megatron.core import dist_checkpointing

    Path(f"{work}/step").mkdir()
    dist_checkpointing.save({"model": student.sharded_state_dict()}, f"{work}/step")
    export_mcore_student_to_qwen3_omni(f"{work}/step", hf, f"{work}/export_step", meta_dir=f"{work}/audio")
    return out


def _parallel(hf: str, work: str, ids: torch.Tensor, mel: torch.Tensor, lens: torch.Tensor, layout: dict,
              overrides: dict) -> dict:
    """Load the TP=1 checkpoint under ``layout`` (resharded on load) and run the same prompt."""
    from megatron_xopd.convert.qwen3_omni import build_omni_student_from_mcore
    from megatron_xopd.runtime import ParallelConfig, initialize_model_parallel, set_seed

    initialize_model_parallel(ParallelConfig(**layout))
    set_seed(0)
    student, _ = build_omni_student_from_mcore(f"{work}/audio", **overrides)
    return {"logits": _student_logits(student, ids, audio=mel, audio_lens=lens),
            "local_experts": len(student.language_model.decoder.layers[0].mlp.experts.local_experts),
            "sequence_parallel": student.config.sequence_parallel}


def _trainer_student(work: str, layout: dict, source: str, ids: torch.Tensor, audio: torch.Tensor,
                     audio_lens: torch.Tensor) -> dict:
    """The student as the trainer builds it (build_models from model.student.mcore_path), on the same audio."""
    from megatron_xopd.data.tokenizer import load_tokenizer
    from megatron_xopd.runtime import initialize_model_parallel, set_seed
    from megatron_xopd.trainer import to_run_config
    from megatron_xopd.trainer.build import build_models
    from tests._trainer_setup import tiny_llm

    run = to_run_config({
        "trainer": {"parallel": layout},
        "model": {"tokenizer": f"{work}/features", "audio_locator": "<|audio_pad|>",
                  "student": {"mcore_path": f"{work}/features", "perception": {"source": source}},
                  "teacher": {"llm": tiny_llm(vocab_size=AUDIO, max_position_embeddings=64)}},
        "data": {"train": f"{work}/none.jsonl", "speech_input": source},
    })
    initialize_model_parallel(run.trainer.parallel)
    set_seed(0)
    models = build_models(run, load_tokenizer(f"{work}/features", audio_locator="<|audio_pad|>"))
    student = models.student
    return {"logits": _student_logits(student, ids, audio=audio, audio_lens=audio_lens),
            "tower_params": sum(p.numel() for p in student.perception.parameters()),
            "frozen": not any(p.requires_grad for p in student.perception.parameters()),
            "text_vocab": models.text_vocab_size, "locator": models.audio_locator_id}


@torch.no_grad()
def hf_audio_reference(hf: Path) -> dict:
    """transformers on the two waveforms: logits of the spoken prompts and the tower's outputs (padded, lengths)."""
    from megatron_xopd.models.qwen3_omni import audio_output_lengths

    waves, lens = waveforms()
    mel, frames = processor_mel(hf, waves, lens)
    ids = prompts()[0]
    model = hf_thinker(hf)
    mask = (torch.arange(mel.shape[1]) < frames[:, None]).long()
    logits = model(input_ids=ids, input_features=mel.transpose(1, 2), feature_attention_mask=mask,
                   attention_mask=torch.ones_like(ids)).logits
    tower = model.get_audio_features(mel.transpose(1, 2), mask).last_hidden_state
    tokens = audio_output_lengths(frames)
    cached = torch.nn.utils.rnn.pad_sequence(list(tower.split(tokens.tolist())), batch_first=True)
    return {"ids": ids, "waves": waves, "lens": lens, "logits": logits, "cached": cached, "tokens": tokens}


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def omni(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("omni")
    hf = make_thinker(root / "hf")
    ids, mel, lens = prompts()
    out = run_distributed(_convert_and_run, 1, str(hf), str(root), ids, mel, lens, tp=1)[0]
    return {"root": root, "hf": hf, "ids": ids, "mel": mel, "lens": lens, "ref": hf_logits(hf, ids, mel, lens), **out}


# --------------------------------------------------------------------------------------------- tests


def test_student_logits_match_transformers(omni):
    assert omni["ref"].shape == omni["audio"].shape
    diff = (omni["audio"] - omni["ref"]).abs().max().item()
    assert diff < ATOL, diff
    assert omni["frozen"] and omni["trainable_llm"]
    assert omni["meta"]["audio_token_id"] == AUDIO


def test_cached_tower_outputs_give_the_same_logits(omni):
    assert omni["features_params"] == 0  # source=features holds no tower
    assert (omni["features"] - omni["ref"]).abs().max().item() < ATOL


@pytest.fixture(scope="module")
def spoken(omni) -> dict:
    return hf_audio_reference(omni["hf"])


@pytest.mark.parametrize("source", ["audio", "features"])
def test_trainer_builds_the_omni_student(omni, spoken, source):
    """build_models on model.student.mcore_path = the converted thinker: from waveforms (the frozen tower runs on
    the processor's log-mel in the step) or from the tower's cached outputs, transformers' logits within 1e-4."""
    audio, lens = (spoken["waves"], spoken["lens"]) if source == "audio" else (spoken["cached"], spoken["tokens"])
    got = run_distributed(_trainer_student, 1, str(omni["root"]), {}, source, spoken["ids"], audio, lens)[0]
    assert (got["logits"] - spoken["logits"]).abs().max().item() < ATOL
    assert got["locator"] == AUDIO and got["text_vocab"] == AUDIO  # the thinker's text ids: below its audio tokens
    assert got["frozen"] and (got["tower_params"] > 0) == (source == "audio")


@pytest.mark.parity
@pytest.mark.slow
def test_trainer_builds_the_omni_student_at_ep2(omni, spoken):
    for source in ("audio", "features"):
        audio, lens = (spoken["waves"], spoken["lens"]) if source == "audio" else (spoken["cached"], spoken["tokens"])
        got = run_distributed(_trainer_student, 2, str(omni["root"]), {"expert_model_parallel_size": 2}, source,
                              spoken["ids"], audio, lens)
        for rank in got:
            assert (rank["logits"] - spoken["logits"]).abs().max().item() < ATOL, source


def test_trainer_refuses_a_wrong_locator_or_source(omni):
    from megatron_xopd.models import ModelConfigError
    from megatron_xopd.trainer import to_run_config
    from megatron_xopd.trainer.build import omni_student_dir

    work = omni["root"]
    base = {"model": {"student": {"mcore_path": f"{work}/features", "perception": {"source": "features"}}},
            "data": {"train": "x", "speech_input": "features"}}
    with pytest.raises(ModelConfigError, match="audio_token_id 150"):
        omni_student_dir(to_run_config(base), AUDIO_START)
    base["data"]["speech_input"] = "audio"
    with pytest.raises(ModelConfigError, match="data.speech_input=audio but model.student.perception.source=features"):
        omni_student_dir(to_run_config(base), AUDIO)


def test_rope_index_is_transformers(omni):
    """transformers' get_rope_index on our audio+text prompt: equal rows, 0..S-1 (what megatron's RoPE applies)."""
    from megatron_xopd.models.qwen3_omni import audio_text_rope_index

    model = hf_thinker(omni["hf"])
    ids, lens = omni["ids"], omni["lens"]
    for mask in (torch.ones_like(ids), torch.cat([torch.zeros(2, 2, dtype=torch.long), torch.ones_like(ids)[:, 2:]], 1)):
        ref, _ = model.model.get_rope_index(ids, None, None, mask, False, lens)
        assert torch.equal(audio_text_rope_index(mask).to(ref.dtype), ref)
    assert torch.equal(audio_text_rope_index(torch.ones_like(ids))[0], torch.arange(ids.shape[1]).expand_as(ids))


def test_export_gives_identical_transformers_logits(omni):
    from safetensors.torch import load_file

    export = omni["root"] / "export"
    assert sorted(p.name for p in export.iterdir()) == sorted(p.name for p in omni["hf"].iterdir())
    old, new = load_file(str(omni["hf"] / "model.safetensors")), load_file(str(export / "model.safetensors"))
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    got = hf_logits(export, omni["ids"], omni["mel"], omni["lens"])
    assert torch.equal(got, omni["ref"])
    step = load_file(str(omni["root"] / "export_step" / "model.safetensors"))
    assert all(torch.equal(old[k], step[k]) for k in old)


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("layout,ranks,overrides", [
    ({"expert_model_parallel_size": 2}, 2, {}),
    # TP x EP on gloo: the alltoall dispatcher fails here in gloo all_gather (dispatch_postprocess gathers uneven
    # output_split_sizes over TP); the allgather dispatcher runs
    ({"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2, "sequence_parallel": True}, 4,
     {"moe_token_dispatcher_type": "allgather"}),
], ids=["ep2", "tp2xep2"])
def test_parallel_layouts_equal_transformers(omni, layout, ranks, overrides):
    got = run_distributed(_parallel, ranks, str(omni["hf"]), str(omni["root"]), omni["ids"], omni["mel"], omni["lens"],
                          layout, overrides)[0]
    assert got["local_experts"] == 3  # 6 experts over EP=2
    assert got["sequence_parallel"] == layout.get("sequence_parallel", False)
    assert (got["logits"] - omni["ref"]).abs().max().item() < ATOL


def test_left_padded_positions_are_refused(omni):
    from megatron_xopd.models.qwen3_omni import Qwen3OmniStudent

    positions = torch.arange(6).expand(1, -1) - 1
    with pytest.raises(ValueError, match="left-padded"):
        Qwen3OmniStudent.forward(None, torch.zeros(1, 6, dtype=torch.long), positions, None)  # type: ignore[arg-type]


@pytest.mark.slow
def test_conversion_cli_end_to_end(omni, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "tools/convert_qwen3_omni_to_mcore.py"), str(omni["hf"]),
                          str(tmp_path / "ckpt"), "--perception", "features"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "ckpt" / "metadata.json").is_file() and (tmp_path / "ckpt" / "student.yaml").is_file()
    # exported at EP=2 on 2 ranks: each expert streams to rank 0 from the rank that holds it (convert/qwen3_omni.py)
    port = str(20000 + int.from_bytes(os.urandom(2), "little") % 20000)
    exported = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                               port, str(ROOT / "tools/export_student_to_qwen3_omni.py"), str(tmp_path / "ckpt"),
                               str(omni["hf"]), str(tmp_path / "hf_out"), "--ep", "2"],
                              capture_output=True, text=True, env=env)
    assert exported.returncode == 0, exported.stderr[-2000:]
    got = hf_logits(tmp_path / "hf_out", omni["ids"], omni["mel"], omni["lens"])
    assert torch.equal(got, omni["ref"])
    bad = subprocess.run([sys.executable, str(ROOT / "tools/convert_qwen3_omni_to_mcore.py"), str(omni["hf"]),
                          str(tmp_path / "bad"), "--ep", "4"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "num_moe_experts" in bad.stderr, bad.stderr[-500:]


# --------------------------------------------------------------------------------------------- the paper recipe


def _recipe_models(run) -> list[tuple[str, object]]:
    """The recipe's student and teacher on paper: the model presets with the recipe's llm fields on top."""
    import yaml

    from megatron_xopd.models import GPTModelConfig

    presets = {"model.student.llm": "qwen3_omni_30b_a3b_thinker", "model.teacher.llm": "qwen3_30b_a3b"}
    sections = {"model.student.llm": run.model.student.llm, "model.teacher.llm": run.model.teacher.llm}
    out = []
    for where, preset in presets.items():
        values = yaml.safe_load((ROOT / "examples/conf/models" / f"{preset}.yaml").read_text())
        out.append((where, GPTModelConfig.from_dict({**values, **dict(sections[where])}, where=where)))
    return out


def test_paper_recipe_layout_fits_the_paper_models():
    """paper_qwen3_omni.yaml composes with Hydra, states its expert-parallel layout in real keys, and that layout
    fits the paper's models on 64 GPUs (no weights built); the commands its header names exist."""
    import re

    from hydra import compose, initialize_config_dir

    from megatron_xopd.trainer import register_schema, to_run_config

    register_schema()
    with initialize_config_dir(config_dir=str(ROOT / "examples" / "conf"), version_base=None):
        run = to_run_config(compose("paper_qwen3_omni"))
    layout = run.trainer.parallel
    assert (layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size,
            layout.expert_model_parallel_size, layout.sequence_parallel) == (4, 2, 8, True)
    assert layout.data_parallel_size(64) == 8
    models = _recipe_models(run)
    assert layout.problems(64, *models) == []
    for _, cfg in models:
        cfg.validate_parallel(4, 2, 8, layout.expert_tensor_parallel_size or 4)
    assert run.model.student.perception == {"source": "features"}  # the tower's cached outputs, spliced as they are
    # the student's own tokenizer, whose family (Qwen3-Omni) gives the locator <|audio_pad|> when none is named
    assert run.model.tokenizer == "ckpt/student" and run.model.audio_locator is None
    assert run.data.speech_input == "features"
    # the same recipe without sequence parallelism, or with an EP that does not divide 128 experts, is refused
    layout.sequence_parallel = False
    assert any("sequence_parallel" in p for p in layout.problems(64, *models))
    layout.sequence_parallel, layout.expert_model_parallel_size = True, 3
    assert any("num_moe_experts (128)" in p for p in layout.problems(64, *models))
    text = (ROOT / "examples/conf/paper_qwen3_omni.yaml").read_text()
    commands = set(re.findall(r"(?:tools|examples)/[\w/]+\.(?:py|sbatch)", text))
    assert {"tools/convert_hf_to_mcore.py", "tools/convert_qwen3_omni_to_mcore.py", "tools/cache_audio_features.py",
            "tools/synthesize_speech_prompts.py", "tools/export_student_to_qwen3_omni.py",
            "tools/compare_logits.py"} <= commands
    assert all((ROOT / c).is_file() for c in commands), [c for c in commands if not (ROOT / c).is_file()]


# --------------------------------------------------------------------------------------------- the tower-output cache


def _wav_cuts(root: Path, waves: torch.Tensor, lens: torch.Tensor) -> Path:
    """A manifest of the two waveforms as wav cuts, and a third cut whose audio file is gone (a bad cut)."""
    import soundfile as sf
    from lhotse import CutSet, Recording

    cuts = []
    for i, (wave, n) in enumerate(zip(waves, lens.tolist())):
        sf.write(root / f"a{i}.wav", wave[:n].numpy(), 16000, subtype="FLOAT")
        cuts.append(Recording.from_file(root / f"a{i}.wav", recording_id=f"a{i}").to_cut())
    sf.write(root / "gone.wav", waves[0].numpy(), 16000, subtype="FLOAT")
    cuts.insert(1, Recording.from_file(root / "gone.wav", recording_id="gone").to_cut())
    (root / "gone.wav").unlink()
    CutSet.from_cuts(cuts).to_file(root / "cuts.jsonl.gz")
    return root / "cuts.jsonl.gz"


@pytest.mark.parity
@pytest.mark.slow
def test_cache_audio_features_equals_get_audio_features(omni, spoken, tmp_path):
    """tools/cache_audio_features.py under torchrun (2 ranks): the tower's outputs of each cut equal transformers'
    get_audio_features within 1e-5; the bad cut is skipped and named; a rerun encodes nothing; without
    --skip-bad-cuts the bad cut is an error naming it."""
    from lhotse import CutSet

    cuts = _wav_cuts(tmp_path, spoken["waves"], spoken["lens"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = str(20000 + os.getpid() % 20000)
    cmd = ["torchrun", "--nproc-per-node", "2", "--master-port", port, str(ROOT / "tools/cache_audio_features.py"),
           "--student", str(omni["root"] / "features"), "--cuts", str(cuts), "--out", str(tmp_path / "out.jsonl.gz"),
           "--skip-bad-cuts", "--no-progress", "--batch-size", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "gone" in out.stderr and "audio file missing" in out.stderr
    written = CutSet.from_file(tmp_path / "out.jsonl.gz")
    assert list(written.ids) == ["a0", "a1"]
    for i, cut in enumerate(written):
        got = torch.from_numpy(cut.load_custom("encoder_features"))
        ref = spoken["cached"][i, : int(spoken["tokens"][i])]
        assert got.shape == ref.shape and (got - ref).abs().max().item() < 1e-5
    progress = sorted(tmp_path.glob("out.jsonl.gz.progress*"))
    assert len(progress) == 2  # one file per rank
    lines = [p.read_text() for p in progress]
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.read_text() for p in progress] == lines  # resumed: nothing encoded again
    assert list(CutSet.from_file(tmp_path / "out.jsonl.gz").ids) == ["a0", "a1"]
    strict = subprocess.run([sys.executable, str(ROOT / "tools/cache_audio_features.py"), "--student",
                             str(omni["root"] / "features"), "--cuts", str(cuts), "--out", str(tmp_path / "strict.jsonl.gz"),
                             "--no-progress"], capture_output=True, text=True, env=env)
    assert strict.returncode != 0 and "gone" in strict.stderr and "audio file missing" in strict.stderr


@pytest.mark.parity
@pytest.mark.slow
def test_compare_logits_audio_on_the_thinker(omni, spoken, tmp_path):
    """tools/compare_logits.py --audio WAV at EP=2 on the converted thinker: one JSON line, logits within 1e-4 of
    transformers' thinker on the processor's layout of that audio, 16 greedy tokens equal."""
    import soundfile as sf

    wav = tmp_path / "prompt.wav"
    sf.write(wav, spoken["waves"][0, : int(spoken["lens"][0])].numpy(), 16000, subtype="FLOAT")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(["torchrun", "--nproc-per-node", "2", "--master-port", str(20000 + os.getpid() % 20000 + 1),
                          str(ROOT / "tools/compare_logits.py"), "--hf", str(omni["hf"]), "--mcore",
                          str(omni["root"] / "features"), "--audio", str(wav), "--ep", "2", "--json"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["max_abs_diff"] < ATOL and result["greedy_equal"] and len(result["hf_tokens"]) == 16
    # <|audio_start|> + 17 audio tokens (130 mel frames) + <|audio_end|> + 12 text ids
    assert result["prompt_tokens"] == 1 + int(spoken["tokens"][0]) + 1 + 12
