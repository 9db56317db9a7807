"""Two tiny random HF checkpoints in the paper's shape, built offline: the stand-ins for the downloads.

    python examples/paper_tiny/make_models.py --out runs/paper_tiny/hf

``OUT/teacher``: a Qwen3-MoE ``Qwen3MoeForCausalLM`` (as Qwen3-30B-A3B-Instruct: 2 layers, 4 experts, top-2) with
SmolLM2's tokenizer (49152 ids). ``OUT/student``: a Qwen3-Omni thinker ``Qwen3OmniMoeThinkerForConditionalGeneration``
(2-layer MoE LLM with 6 experts, a 2-layer audio tower, a tiny vision tower) with the same tokenizer plus the
thinker's audio tokens after it (``<|audio_start|>`` 49152, ``<|audio_end|>`` 49153, ``<|audio_pad|>`` 49154, as
Qwen3-Omni's tokenizer adds them after Qwen3's) and the processor's feature extractor (Whisper, 128 mel bins).
``OUT/prompts.jsonl``: a handful of spoken-arithmetic prompts for tools/synthesize_speech_prompts.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

TEXT_VOCAB = 49152
AUDIO_START, AUDIO_END, AUDIO_PAD = TEXT_VOCAB, TEXT_VOCAB + 1, TEXT_VOCAB + 2
PROMPTS = ["What is 2 plus 3?", "What is 7 plus 1?", "What is 4 plus 4?", "What is 9 minus 5?",
           "What is 6 plus 2?", "What is 3 times 3?"]
ANSWERS = ["5", "8", "8", "4", "8", "9"]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that the tiny models' distributions differ (a default init gives near-uniform ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "audio_tower" not in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


# Qwen3-Omni's chat template, reduced to what a spoken or written one-turn prompt uses: ChatML, an audio item as
# <|audio_start|><|audio_pad|><|audio_end|> (the processor expands the pad to the tower's output length). The
# teacher keeps SmolLM2's own template (its default system prompt included): each model is prompted its own way.
OMNI_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'audio' or 'audio' in c %}<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer(with_audio: bool):
    from transformers import AutoTokenizer

    from megatron_xopd.convert.sources import resolve_path

    tok = AutoTokenizer.from_pretrained(str(resolve_path("builtin:smollm2")))
    if with_audio:
        tok.add_special_tokens({"additional_special_tokens": ["<|audio_start|>", "<|audio_end|>", "<|audio_pad|>"]},
                               replace_extra_special_tokens=False)
        got = tok.convert_tokens_to_ids(["<|audio_start|>", "<|audio_end|>", "<|audio_pad|>"])
        assert got == [AUDIO_START, AUDIO_END, AUDIO_PAD], got
        tok.chat_template = OMNI_CHAT_TEMPLATE
    return tok


def make_teacher(path: Path, seed: int = 1) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=TEXT_VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                            mlp_only_layers=[], max_position_embeddings=512, tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(config).float()
    _randomize(model, seed)
    model.save_pretrained(str(path))
    tokenizer(False).save_pretrained(str(path))


def make_student(path: Path, seed: int = 2) -> None:
    from transformers import (Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration,
                              WhisperFeatureExtractor)

    config = Qwen3OmniMoeThinkerConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                          output_dim=32, n_window=50, n_window_infer=100, downsample_hidden_size=8,
                          max_source_positions=1500),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                           deepstack_visual_indexes=[0], patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(vocab_size=TEXT_VOCAB + 8, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                         mlp_only_layers=[], max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2],
                                          "mrope_interleaved": True}),
        audio_token_id=AUDIO_PAD, audio_start_token_id=AUDIO_START, audio_end_token_id=AUDIO_END,
        image_token_id=TEXT_VOCAB + 3, video_token_id=TEXT_VOCAB + 4, vision_start_token_id=TEXT_VOCAB + 5)
    config.architectures = ["Qwen3OmniMoeThinkerForConditionalGeneration"]
    model = Qwen3OmniMoeThinkerForConditionalGeneration(config).float()
    _randomize(model, seed)
    model.save_pretrained(str(path))
    tokenizer(True).save_pretrained(str(path))
    WhisperFeatureExtractor(feature_size=128).save_pretrained(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    make_teacher(args.out / "teacher")
    make_student(args.out / "student")
    with open(args.out / "prompts.jsonl", "w") as f:
        for i, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS)):
            f.write(json.dumps({"id": f"p{i}", "prompt": prompt, "answer": answer}) + "\n")
    print(f"wrote {args.out}/teacher, {args.out}/student, {args.out}/prompts.jsonl")


if __name__ == "__main__":
    main()
