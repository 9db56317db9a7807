"""A tiny X-OPD run for the trainer tests: random tiny LLMs with SmolLM2's real tokenizer, feature-cut data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lhotse import CutSet, MonoCut
from lhotse.features.io import NumpyFilesWriter

FEATURE_DIM = 16
PROMPTS = ["What is 2 + 3?", "Name a colour.", "What is 7 + 1?", "Say hello.", "What is 4 + 4?", "Count to three.",
           "What is 9 + 0?", "Spell cat."]


def write_feature_cuts(root: Path, prompts: list[str] = PROMPTS, *, frames: int = 6, seed: int = 0) -> Path:
    """A manifest of prompt cuts carrying random cached 'encoder features' [frames, 16]."""
    rng = np.random.default_rng(seed)
    cuts = []
    with NumpyFilesWriter(str(root / "features")) as writer:
        for i, text in enumerate(prompts):
            n = frames + i % 3
            cut = MonoCut(id=f"cut{i}", start=0.0, duration=n * 0.08, channel=0,
                          custom={"text_prompt": text, "answer": str(i)})
            cut.encoder_features = writer.store_array(cut.id, rng.standard_normal((n, FEATURE_DIM)).astype(np.float32),
                                                      frame_shift=0.08, temporal_dim=0)
            cuts.append(cut)
    path = root / "cuts.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(path)
    return path


def write_tiny_hf(path: Path, seed: int) -> Path:
    """A random tiny HF Llama with SmolLM2's vocabulary size: the same weights at any TP/PP layout."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def tiny_llm(**overrides) -> dict:
    llm = dict(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
               num_query_groups=2, vocab_size=49152, max_position_embeddings=256, init_method_std=0.2)
    llm.update(overrides)
    return llm


def run_config(root: Path, manifest: Path, *, hf: bool = False, **sections) -> dict:
    """A config dict for :func:`megatron_xopd.trainer.to_run_config`; ``sections`` update it per group.

    With ``hf``, student and teacher load tiny HF checkpoints (written next to the manifest), else random init.
    """
    cfg = {
        "trainer": {"max_steps": 3, "seed": 7, "micro_batch_size": 4,
                    "rollout": {"max_new_tokens": 6, "temperature": 1.0}},
        "model": {
            "tokenizer": "builtin:smollm2",
            "student": {"llm": tiny_llm(), "perception": {
                "source": "features", "feature_dim": FEATURE_DIM, "freeze_adapter": False,
                "nemo": {"modality_adapter": {"_target_": "nemo.collections.speechlm2.modules.perception.IdentityConnector"}}}},
            "teacher": {"llm": tiny_llm()},
        },
        "xopd": {"lam": 0.5, "n_samples": 2},
        "data": {"train": str(manifest), "speech_input": "features", "prompts_per_step": 2, "num_buckets": 2},
        "optim": {"lr": 1e-3},
        "checkpoint": {"dir": str(root / "ckpt"), "save_every": 0},
        "logging": {"dir": str(root / "logs"), "tensorboard": False, "progress": False},
    }
    if hf:
        cfg["model"]["student"].update(llm={}, hf_path=str(write_tiny_hf(manifest.parent / "student_hf", seed=1)))
        cfg["model"]["teacher"].update(llm={}, hf_path=str(write_tiny_hf(manifest.parent / "teacher_hf", seed=2)))
    for group, values in sections.items():
        _merge(cfg.setdefault(group, {}), values)
    return cfg


def _merge(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = value


def train(cfg: dict) -> list[dict]:
    """Run the trainer (inside a spawned rank) and return the metrics it logged."""
    import json

    from megatron_xopd.trainer import XOPDTrainer, to_run_config

    run = to_run_config(cfg)
    XOPDTrainer(run).train()
    path = Path(run.logging.dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def response_length_parity(response: str, reference: str) -> float:
    """A test scorer that depends on the whole generated text (so equal scores mean equal generations)."""
    return float(len(response) % 2)


def snapshot(trainer) -> dict:
    """Copies of the student's LLM and perception weights."""
    return {
        "llm": {k: v.detach().clone() for k, v in trainer.student.language_model.state_dict().items()
                if not k.endswith("_extra_state")},
        "perception": {k: v.detach().clone() for k, v in trainer.student.perception.state_dict().items()},
    }


def train_with_snapshots(cfg: dict) -> tuple[dict, dict, list[dict], dict]:
    """Like :func:`train`, with the student's weights before and after, and the teacher's greedy answer cache."""
    import json

    from megatron_xopd.trainer import XOPDTrainer, to_run_config

    run = to_run_config(cfg)
    trainer = XOPDTrainer(run)
    before = snapshot(trainer)
    trainer.train()
    rows = [json.loads(line) for line in (Path(run.logging.dir) / "metrics.jsonl").read_text().splitlines()]
    return before, snapshot(trainer), rows, dict(trainer.collector._teacher_answers)
