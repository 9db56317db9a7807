"""Pad an HF model's attention heads so that tensor parallelism can split them, without changing its function.

Megatron splits query heads and key/value groups evenly over TP ranks. SmolLM2-135M (9 query heads, 3 KV
groups) fits no even TP size. :func:`pad_attention_heads` rewrites the attention of every layer to ``H'``
query heads with one KV head each (multi-head attention), ``H'`` the smallest count >= H that TP divides and
that divides the hidden size (transformers requires the latter even with an explicit ``head_dim``):

* query head h keeps its ``q_proj`` rows and gets a copy of the ``k_proj``/``v_proj`` rows of its old group;
* the new heads (h >= H) have zero ``q_proj``, ``k_proj``, ``v_proj`` rows and zero ``o_proj`` columns, so they
  add exactly nothing to the residual stream.

The output is the same function (up to float rounding in the attention sums), at the price of ``H'/G`` times
more key/value work. ``head_dim`` is written explicitly, since ``hidden_size / H'`` is no longer it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .hf import HFCheckpoint, copy_tokenizer_files, save_hf_checkpoint


def pad_attention_heads(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], tensor_parallel_size: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """HF Llama/Qwen tensors and config -> the padded model's (see the module docstring)."""
    heads = int(config["num_attention_heads"])
    groups = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    hidden = int(config["hidden_size"])
    new_heads = next(n for n in range(heads, hidden + 1) if n % tensor_parallel_size == 0 and hidden % n == 0)
    group_of = torch.arange(heads) // (heads // groups)
    out = dict(state_dict)
    for name, tensor in state_dict.items():
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            out[name] = _pad_rows(tensor.unflatten(0, (heads, head_dim)), new_heads).flatten(0, 1)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias")):
            per_group = tensor.unflatten(0, (groups, head_dim))
            out[name] = _pad_rows(per_group[group_of], new_heads).flatten(0, 1)
        elif name.endswith("self_attn.o_proj.weight"):
            cols = tensor.unflatten(1, (heads, head_dim))
            out[name] = _pad_rows(cols.transpose(0, 1), new_heads).transpose(0, 1).flatten(1, 2)
    new_config = {**config, "num_attention_heads": new_heads, "num_key_value_heads": new_heads, "head_dim": head_dim}
    return out, new_config


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    pad = tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])
    return torch.cat([tensor, pad])


def write_padded_copy(src_dir, out_dir, tensor_parallel_size: int):
    """Write the padded model (weights, config, tokenizer files) to ``out_dir``, atomically; returns it.

    Safe to call from several ranks at once: each writes a private temporary copy, the first rename wins.
    """
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    reader = HFCheckpoint(src_dir)
    tensors, config = pad_attention_heads({k: reader[k] for k in reader.keys()}, reader.config, tensor_parallel_size)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_checkpoint(tmp, tensors, config)
    copy_tokenizer_files(src_dir, tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out
