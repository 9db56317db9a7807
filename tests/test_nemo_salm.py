"""The NeMo round trip of examples/nemo_salm/salm_xopd.py: a tiny SALM built by NeMo's own classes -> X-OPD (2
steps, on a NeMo JSON manifest) -> SALM directory -> ``SALM.from_pretrained``. The exported SALM equals the trained
student (logits), its frozen perception is the input's bit for bit, only LLM weights changed, it generates from
audio, and the run directory is laid out as NeMo's exp_manager's."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import soundfile as sf
import torch

from megatron_xopd.testing import run_distributed
from tests.test_convert import randomize, salm_config, save_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SR = 16000


def make_salm_and_teacher(root: Path) -> tuple[Path, Path]:
    """A LoRA-free SALM (tiny Qwen3 LLM, tiny FastConformer perception) and a text teacher with its tokenizer."""
    from nemo.collections.speechlm2.models import SALM
    from transformers import Qwen3Config, Qwen3ForCausalLM

    llm_dir = root / "salm_llm"
    size = save_tiny_tokenizer(llm_dir)
    llm_cfg = Qwen3Config(vocab_size=size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                          tie_word_embeddings=True, rope_theta=1e6, architectures=["Qwen3ForCausalLM"])
    llm_cfg.save_pretrained(str(llm_dir))
    config = salm_config(llm_dir, 64)
    config.pop("lora")
    salm = SALM(config)
    randomize(salm, seed=3)
    salm.save_pretrained(str(root / "salm"))
    teacher_dir = root / "teacher"
    torch.manual_seed(5)
    Qwen3ForCausalLM(llm_cfg).save_pretrained(str(teacher_dir))
    save_tiny_tokenizer(teacher_dir)
    return root / "salm", teacher_dir


def write_manifest(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, text in enumerate(["say one", "say two", "count to three", "add four"]):
        t = np.arange(int((0.3 + 0.05 * i) * SR)) / SR
        sf.write(root / f"u{i}.wav", (0.1 * np.sin(2 * np.pi * (220 + 40 * i) * t)).astype(np.float32), SR)
        lines.append({"audio_filepath": f"u{i}.wav", "duration": len(t) / SR, "text": text})
    manifest = root / "train_manifest.json"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def _recipe():
    spec = importlib.util.spec_from_file_location("nemo_salm_recipe", ROOT / "examples/nemo_salm/salm_xopd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _round_trip(salm: str, teacher: str, manifest: str, out: str, ids: torch.Tensor) -> dict:
    overrides = [f"data.train.manifest_filepath={manifest}", "trainer.max_steps=2", "trainer.seed=11",
                 "trainer.rollout.max_new_tokens=4", "data.prompts_per_step=2", "data.num_buckets=2",
                 "optim.lr=0.01", "logging.progress=false"]
    trainer, export_dir = _recipe().run(salm, teacher, out, overrides)
    model = trainer.student.language_model.eval()
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    return {"export": str(export_dir), "logits": logits.clone(), "run_dir": trainer.cfg.logging.dir,
            "checkpoints": trainer.cfg.checkpoint.dir}


@pytest.mark.slow
def test_salm_in_xopd_salm_out(tmp_path):
    from nemo.collections.speechlm2.models import SALM

    salm_dir, teacher_dir = make_salm_and_teacher(tmp_path)
    manifest = write_manifest(tmp_path / "data")
    ids = torch.tensor([[1, 40, 41, 42, 2, 3, 50, 60, 70]])
    got = run_distributed(_round_trip, 1, str(salm_dir), str(teacher_dir), str(manifest), str(tmp_path / "exp"), ids)[0]

    original = SALM.from_pretrained(str(salm_dir)).eval()
    exported = SALM.from_pretrained(got["export"]).eval()
    before, after = original.state_dict(), exported.state_dict()
    assert before.keys() == after.keys()
    perception = [k for k in before if k.startswith("perception.")]
    assert perception and all(torch.equal(before[k], after[k]) for k in perception)  # frozen: bit for bit
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("llm.") or k == "embed_tokens.weight" for k in changed)
    assert any(".layers." in k for k in changed)

    # The exported SALM is the trained student: same text logits (SALM's HF path vs megatron's).
    with torch.no_grad():
        salm_logits = exported(exported.embed_tokens(ids))["logits"]
        input_logits = original(original.embed_tokens(ids))["logits"]
    rows = salm_logits.shape[-1]
    torch.testing.assert_close(salm_logits, got["logits"][..., :rows], atol=1e-4, rtol=0)
    assert (salm_logits - input_logits).abs().max() > 1e-3  # and training moved it
    # Its logits differ from the input's only through the LLM: the input SALM with the exported LLM weights is it.
    hybrid = SALM.from_pretrained(str(salm_dir)).eval()
    hybrid.load_state_dict({k: v for k, v in after.items() if not k.startswith("perception.")}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(hybrid(hybrid.embed_tokens(ids))["logits"], salm_logits, atol=0, rtol=0)

    # NeMo generates from speech with it.
    audio, _ = sf.read(tmp_path / "data" / "u0.wav", dtype="float32")
    answer = exported.generate(prompts=[[{"role": "user", "content": f"{exported.audio_locator_tag}"}]],
                               audios=torch.from_numpy(audio)[None], audio_lens=torch.tensor([len(audio)]),
                               max_new_tokens=3)
    assert answer.shape[0] == 1 and 1 <= answer.shape[1] <= 3 + 64

    # NeMo exp_manager's layout: <exp_dir>/<name>/ (resumable: no version level), hparams, checkpoints, TensorBoard.
    run_dir = tmp_path / "exp" / "salm_xopd"
    assert Path(got["run_dir"]) == run_dir and Path(got["checkpoints"]) == run_dir / "checkpoints"
    assert (run_dir / "hparams.yaml").is_file() and (run_dir / "checkpoints" / "step_0000002").is_dir()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    rows_logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_logged] == [1, 2] and rows_logged[-1]["data/cuts_seen"] >= 4
