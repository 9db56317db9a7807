"""The trained student's LLM as an HF directory (``checkpoint.export_hf``), so that a later run loads it with
``model.teacher.hf_path`` or ``model.student.hf_path``: e.g. an LLM fine-tuned on text that then serves as the
text teacher, or as the student's LLM."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch.distributed as dist

from ..convert.checkpoint import HF_CONFIG, export_model_to_hf
from ..convert.hf import copy_tokenizer_files, read_json
from ..convert.sources import resolve_path
from .build import Models, llm_config
from .config import RunConfig


def source_hf_config(cfg: RunConfig) -> dict | None:
    """The ``config.json`` of the checkpoint the student's LLM came from (token ids etc. are kept), if any."""
    section = cfg.model.student
    if section.hf_path:
        return read_json(resolve_path(section.hf_path) / "config.json")
    if section.mcore_path and (resolve_path(section.mcore_path) / HF_CONFIG).is_file():
        return read_json(resolve_path(section.mcore_path) / HF_CONFIG)
    return None


def export_student_llm(cfg: RunConfig, models: Models, out_dir: str | Path) -> Path:
    """Write the student's LLM (every rank calls it; rank 0 writes) as ``out_dir``, atomically: config.json,
    safetensors and the tokenizer files of ``model.tokenizer``. The embedding keeps the source checkpoint's rows
    (the student's added audio-locator row is dropped: no text prompt reads it)."""
    out = Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = llm_config(cfg.model.student, "model.student.llm").vocab_size
    llm_cfg = dataclasses.replace(models.student_cfg, vocab_size=rows,
                                  text_vocab_size=min(rows, models.student_cfg.text_vocab_size))
    export_model_to_hf(models.student.language_model, llm_cfg, tmp, hf_config=source_hf_config(cfg))
    if rank == 0:
        tokenizer = resolve_path(cfg.model.tokenizer)
        if tokenizer.is_dir():
            copy_tokenizer_files(tokenizer, tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    dist.barrier()
    return out
