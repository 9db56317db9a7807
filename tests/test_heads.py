"""Head padding for TP: the padded HF model computes the same function and splits over the TP size."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_xopd.convert.heads import pad_attention_heads, write_padded_copy


def _tiny_gqa_llama(tmp_path):
    config = LlamaConfig(vocab_size=97, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "src")
    return model


@pytest.mark.parametrize("tp,heads", [(2, 12), (4, 12), (3, 9)])
def test_padded_heads_split_over_tp_and_keep_the_function(tmp_path, tp, heads):
    model = _tiny_gqa_llama(tmp_path)
    out = write_padded_copy(tmp_path / "src", tmp_path / f"tp{tp}", tp)
    padded = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    cfg = padded.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (heads, heads, 8)
    assert cfg.num_attention_heads % tp == 0
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(padded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_new_heads_are_inert():
    hidden, heads, groups, d = 8, 2, 1, 4
    state = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(heads * d, hidden),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(groups * d, hidden),
        "model.layers.0.self_attn.v_proj.weight": torch.randn(groups * d, hidden),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(hidden, heads * d),
    }
    config = {"num_attention_heads": heads, "num_key_value_heads": groups, "hidden_size": hidden}
    out, new_config = pad_attention_heads(state, config, 4)
    assert new_config["num_attention_heads"] == 4 and new_config["head_dim"] == d
    assert torch.all(out["model.layers.0.self_attn.q_proj.weight"][heads * d :] == 0)
    assert torch.all(out["model.layers.0.self_attn.o_proj.weight"][:, heads * d :] == 0)
    # both original heads read the single original KV group
    k = out["model.layers.0.self_attn.k_proj.weight"]
    torch.testing.assert_close(k[:d], state["model.layers.0.self_attn.k_proj.weight"])
    torch.testing.assert_close(k[d : 2 * d], state["model.layers.0.self_attn.k_proj.weight"])
