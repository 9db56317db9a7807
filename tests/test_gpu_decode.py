"""benchmarks/gpu_decode.py on the CPU (``--allow-cpu``: tiny shapes of both families, float32): every section runs,
decodes transformers' tokens, and reports its rates, so the GPU check's decode section is known to work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_fused_experts_are_split_as_a_checkpoint_names_them():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_decode import checkpoint_tensors

    gate_up, down = torch.arange(2 * 6 * 3).view(2, 6, 3), torch.arange(2 * 3 * 3).view(2, 3, 3)
    out = checkpoint_tensors({"model.layers.0.mlp.experts.gate_up_proj": gate_up,
                              "model.layers.0.mlp.experts.down_proj": down, "model.norm.weight": torch.ones(3)})
    assert torch.equal(out["model.layers.0.mlp.experts.1.gate_proj.weight"], gate_up[1, :3])
    assert torch.equal(out["model.layers.0.mlp.experts.1.up_proj.weight"], gate_up[1, 3:])
    assert torch.equal(out["model.layers.0.mlp.experts.0.down_proj.weight"], down[0])
    assert len(out) == 7


@pytest.mark.slow
def test_gpu_decode_runs_both_models_on_cpu(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_decode.py", "--allow-cpu", "--rows", "3", "--new-tokens", "5",
                           "--probe-tokens", "3", "--budget-s", "100000", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["ok"], result
    for name in ("smollm2", "qwen3_moe"):
        section = result["sections"][name]
        assert section["tokens_match_hf"] and section["rows_matching"] == 3, section
        assert section["new_tokens"] == 5 and section["ours_decode_tok_s"] > 0 and section["hf_decode_tok_s"] > 0
