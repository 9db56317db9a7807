"""MoE GPTs (Qwen3-MoE, Qwen2-MoE) against transformers, under expert, tensor (+sequence) and pipeline parallelism.

Tiny random ``Qwen3MoeForCausalLM`` / ``Qwen2MoeForCausalLM`` are built by transformers from config dicts (float32,
offline) with weights large enough that routing has no near-ties. One 2-rank gloo spawn converts and loads the
Qwen3-MoE checkpoint at EP=1, EP=2, TP=2 (+SP), PP=2 (each load reshards what another layout wrote), exports it
back, and runs the Qwen2-MoE (shared expert with a sigmoid gate) at TP=1; the tests compare with transformers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from megatron_xopd.convert.hf import ConversionError
from megatron_xopd.models import ModelConfigError
from megatron_xopd.testing import run_distributed

VOCAB = 160
EXPERTS = 6
ATOL = 1e-4


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):  # router: spread logits so top-k has clear winners
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def make_qwen3_moe(path: Path, seed: int = 0) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=EXPERTS, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1], router_aux_loss_coef=0.01,
        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False, architectures=["Qwen3MoeForCausalLM"],
    )
    model = Qwen3MoeForCausalLM(config).float()
    _randomize(model, seed)
    model.save_pretrained(str(path))
    return path


def make_qwen2_moe(path: Path, seed: int = 1) -> Path:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, architectures=["Qwen2MoeForCausalLM"],
    )
    model = Qwen2MoeForCausalLM(config).float()
    _randomize(model, seed)
    model.save_pretrained(str(path))
    return path


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------------------------------------- ranks


def _layouts(work: str, q3: str, q2: str, ids: torch.Tensor) -> dict:
    """On 2 ranks: convert at EP=1 and EP=2, load at EP=2, TP=2+SP, PP=2, EP=1; export; Qwen2-MoE at TP=1."""
    import torch.distributed as dist

    from megatron_xopd.convert.checkpoint import build_gpt_from_mcore, convert_hf_to_mcore, export_mcore_to_hf
    from megatron_xopd.convert.compare import compare, hf_model, mcore_logits
    from megatron_xopd.runtime import ParallelConfig, initialize_model_parallel, set_seed

    def load(ckpt: str):
        set_seed(0)
        return build_gpt_from_mcore(ckpt)[0]

    out: dict = {"logits": {}}
    initialize_model_parallel(ParallelConfig())  # EP=1, DP=2
    convert_hf_to_mcore(q3, f"{work}/q3_ep1")
    convert_hf_to_mcore(q2, f"{work}/q2")
    out["q2_logits"] = mcore_logits(load(f"{work}/q2"), ids, VOCAB)
    export_mcore_to_hf(f"{work}/q2", f"{work}/q2_export")

    initialize_model_parallel(ParallelConfig(expert_model_parallel_size=2))
    convert_hf_to_mcore(q3, f"{work}/q3_ep2")
    model = load(f"{work}/q3_ep2")
    out["local_experts"] = len(model.decoder.layers[0].mlp.experts.local_experts)
    out["logits"]["ep2"] = mcore_logits(model, ids, VOCAB)
    hf = hf_model(q3)
    out["greedy_ep2"] = compare(lambda x: hf(x).logits, lambda x: mcore_logits(model, x, VOCAB), ids[:1])
    out["logits"]["ep1_written_at_ep2"] = mcore_logits(load(f"{work}/q3_ep1"), ids, VOCAB)
    export_mcore_to_hf(f"{work}/q3_ep2", f"{work}/q3_export_ep2")

    initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))
    model = load(f"{work}/q3_ep2")
    out["sequence_parallel"] = model.config.sequence_parallel
    out["logits"]["tp2_sp"] = mcore_logits(model, ids, VOCAB)

    initialize_model_parallel(ParallelConfig(pipeline_model_parallel_size=2))
    out["logits"]["pp2"] = mcore_logits(load(f"{work}/q3_ep2"), ids, VOCAB)

    initialize_model_parallel(ParallelConfig())
    out["logits"]["ep2_written_at_ep1"] = mcore_logits(load(f"{work}/q3_ep2"), ids, VOCAB)
    export_mcore_to_hf(f"{work}/q3_ep2", f"{work}/q3_export_ep1")
    return out if dist.get_rank() == 0 else {}


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("moe")
    q3, q2 = make_qwen3_moe(root / "hf_q3"), make_qwen2_moe(root / "hf_q2")
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    out = run_distributed(_layouts, 2, str(root), str(q3), str(q2), ids, tp=1)[0]
    return {"root": root, "q3": q3, "q2": q2, "ids": ids, **out}


# --------------------------------------------------------------------------------------------- tests


def test_config_mapping():
    from megatron_xopd.convert.hf import hf_config_to_model_config, model_config_to_hf_config

    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 100, "hidden_size": 32,
              "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": False,
              "decoder_sparse_step": 2, "mlp_only_layers": [3], "router_aux_loss_coef": 0.001}
    cfg = hf_config_to_model_config(config)
    assert cfg.family == "qwen3" and cfg.qk_layernorm and not cfg.add_qkv_bias
    assert (cfg.num_moe_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size) == (8, 2, 16)
    assert cfg.moe_layer_freq == [0, 1, 0, 0]  # (i + 1) % 2 == 0 and i not in mlp_only_layers
    assert cfg.moe_router_pre_softmax and cfg.moe_aux_loss_coeff == 0.001
    back = model_config_to_hf_config(cfg)
    assert back["architectures"] == ["Qwen3MoeForCausalLM"] and back["mlp_only_layers"] == [0, 2, 3]
    assert back["norm_topk_prob"] is False and back["num_experts"] == 8 and back["moe_intermediate_size"] == 16


@pytest.mark.parity
@pytest.mark.slow
def test_qwen3_moe_logits_match_transformers_at_every_layout(moe):
    ref = hf_logits(moe["q3"], moe["ids"])
    assert moe["local_experts"] == EXPERTS // 2  # EP=2 really split the experts
    assert moe["sequence_parallel"]  # TP=2 turned sequence parallelism on, as megatron's MoE layer needs
    assert set(moe["logits"]) == {"ep2", "ep1_written_at_ep2", "tp2_sp", "pp2", "ep2_written_at_ep1"}
    for layout, logits in moe["logits"].items():
        assert logits.shape == ref.shape, layout
        torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0, msg=layout)


@pytest.mark.parity
@pytest.mark.slow
def test_qwen3_moe_greedy_tokens_equal_at_ep2(moe):
    result = moe["greedy_ep2"]
    assert len(result.hf_tokens) == 16 and len(set(result.hf_tokens)) > 1
    assert result.greedy_equal, (result.hf_tokens, result.mcore_tokens)
    assert result.max_abs_diff < ATOL


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("exported_at", ["ep2", "ep1"])
def test_qwen3_moe_hf_to_mcore_to_hf_is_bitwise(moe, exported_at):
    original = load_file(str(moe["q3"] / "model.safetensors"))
    exported = load_file(str(moe["root"] / f"q3_export_{exported_at}" / "model.safetensors"))
    assert any(".mlp.experts.5.down_proj" in k for k in original)
    assert original.keys() == exported.keys()
    for key in original:
        assert torch.equal(original[key], exported[key]), key
    config = json.loads((moe["root"] / f"q3_export_{exported_at}" / "config.json").read_text())
    assert config["mlp_only_layers"] == [1] and config["norm_topk_prob"] is True
    torch.testing.assert_close(hf_logits(moe["root"] / f"q3_export_{exported_at}", moe["ids"]),
                               hf_logits(moe["q3"], moe["ids"]), atol=0, rtol=0)


@pytest.mark.parity
@pytest.mark.slow
def test_qwen2_moe_shared_expert_matches_transformers(moe):
    ref = hf_logits(moe["q2"], moe["ids"])
    torch.testing.assert_close(moe["q2_logits"], ref, atol=ATOL, rtol=0)
    original = load_file(str(moe["q2"] / "model.safetensors"))
    exported = load_file(str(moe["root"] / "q2_export" / "model.safetensors"))
    assert "model.layers.0.mlp.shared_expert_gate.weight" in original
    assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)


# --------------------------------------------------------------------------------------------- bad input


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_unsupported_moe_architecture_is_named(tmp_path):
    from megatron_xopd.convert.checkpoint import prepare_hf_conversion

    _edit_config(make_qwen3_moe(tmp_path / "m"), architectures=["MixtralForCausalLM"], model_type="mixtral")
    with pytest.raises(ConversionError, match=r"unsupported architecture 'MixtralForCausalLM'.*Qwen3MoeForCausalLM"):
        prepare_hf_conversion(tmp_path / "m")


def test_layout_not_dividing_experts_names_the_field(tmp_path):
    from megatron_xopd.convert.checkpoint import prepare_hf_conversion

    make_qwen3_moe(tmp_path / "m")
    with pytest.raises(ModelConfigError, match=r"model\.num_moe_experts \(6\) is not divisible by expert_model_parallel_size \(4\)"):
        prepare_hf_conversion(tmp_path / "m", 1, 1, 4)
    with pytest.raises(ModelConfigError, match=r"model\.moe_ffn_hidden_size \(16\) is not divisible by expert_tensor_parallel_size \(3\)"):
        from megatron_xopd.convert.hf import hf_config_to_model_config

        hf_config_to_model_config(json.loads((tmp_path / "m" / "config.json").read_text())).validate_parallel(1, 1, 1, 3)


def test_hf_expert_count_differing_from_config_is_named(tmp_path):
    from megatron_xopd.convert.checkpoint import prepare_hf_conversion

    _edit_config(make_qwen3_moe(tmp_path / "m"), num_local_experts=8)
    with pytest.raises(ConversionError, match=r"config\.json num_experts=8, but the checkpoint's tensors hold 6 experts"):
        prepare_hf_conversion(tmp_path / "m")


def _load_with_experts(ckpt: str, experts: int) -> str:
    from megatron_xopd.convert.checkpoint import build_gpt_from_mcore
    from megatron_xopd.runtime import set_seed

    set_seed(0)
    try:
        build_gpt_from_mcore(ckpt, num_moe_experts=experts)
    except ConversionError as err:
        return str(err)
    return "loaded"


@pytest.mark.parity
def test_mcore_expert_count_differing_from_config_is_named(moe):
    message = run_distributed(_load_with_experts, 1, str(moe["root"] / "q3_ep2"), 4, tp=1)[0]
    assert message.startswith("model.num_moe_experts (4) differs from the 6 experts per MoE layer of the checkpoint")


# --------------------------------------------------------------------------------------------- tools


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parity
def test_convert_and_compare_logits_tools(tmp_path):
    """As a user: convert with the CLI (one process), then tools/compare_logits.py at EP=2 under torchrun."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    src = make_qwen3_moe(tmp_path / "hf", seed=7)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    convert = [sys.executable, str(repo / "tools" / "convert_hf_to_mcore.py"), str(src), str(tmp_path / "mcore")]
    proc = subprocess.run(convert, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 experts" in proc.stdout
    compare = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", env["MASTER_PORT"],
               str(repo / "tools" / "compare_logits.py"), "--hf", str(src), "--mcore", str(tmp_path / "mcore"),
               "--ep", "2", "--json"]
    proc = subprocess.run(compare, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert 0 <= result["mean_abs_diff"] <= result["max_abs_diff"] < ATOL
    assert result["greedy_equal"] and len(result["mcore_tokens"]) == 16
