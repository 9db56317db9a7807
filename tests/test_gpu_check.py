"""The prepared GPU check's CPU halves: each script runs end to end on the CPU (``--allow-cpu``) and reports a
result per section, so a GPU session spends its minutes on the GPU, not on fixing the script."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path, **env) -> dict:
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, *args, "--allow-cpu", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **env})
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_gpu_trainer_runs_the_trainer_and_the_rollout_comparison_on_cpu(tmp_path):
    skip = "trainer_moe,save_resume_bf16,offload_linear,sdpa_attention"  # each another trainer run or two on CPU
    result = _run(["benchmarks/gpu_trainer.py", "--steps", "2", "--prompts", "2", "--skip", skip], tmp_path)
    dense, rollout = result["sections"]["trainer_dense"], result["sections"]["rollout"]
    assert dense["ok"], dense
    assert len(dense["loss"]) == 2 and dense["kl_logged"]
    assert 0 <= dense["logprob_gap_max"] < 1e-4  # fp32, the rollout's weights
    # without TE or a second GPU these sections say that they did not run
    if importlib.util.find_spec("transformer_engine") is None:
        assert "no FP8 step was run" in result["sections"]["fp8"]["skipped"]
    assert "no TP=2 / EP=2 step was run" in result["sections"]["multi_gpu"]["skipped"]
    assert rollout["ok"] and rollout["tokens_match_hf"], rollout
    assert rollout["ours_tok_s"] > 0 and rollout["hf_tok_s"] > 0


def test_gpu_trainer_without_cuda_exits_2():
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_trainer.py"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and json.loads(proc.stdout.strip().splitlines()[-1])["error"] == "no CUDA device"


@pytest.mark.slow
def test_gpu_check_times_every_kernel_variant_on_cpu(tmp_path):
    """gpu_check.py's kernel sections interpreted on CPU (TRITON_INTERPRET=1): the bandwidth section times the
    current kernels in both gradient modes and the previous kernels, whose gradients agree; a TP-shard section
    checks values and gradients against float64 and that the padding gradient is zero."""
    skip = "unit,logits_full_fp32,logits_full_bf16,logits_tp_bf16,fused_linear,naive,logprobs"
    result = _run(["benchmarks/gpu_check.py", "--skip", skip], tmp_path, TRITON_INTERPRET="1")
    assert result["ok"], result["failures"]
    repeat = result["sections"]["inplace_repeat"]  # the fresh process: every op twice, against float64
    assert repeat["ok"] and not repeat["failed"] and len([k for k in repeat if k.endswith("_call2:grad")]) == 12
    bandwidth = result["sections"]["bandwidth"]
    assert bandwidth["copy"]["gb_s"] > 0
    for dtype in ("float32", "bfloat16"):
        for kind in ("reverse_kl", "forward_kl", "jsd"):
            row = bandwidth[dtype][kind]
            for label in ("recompute", "grad_in_forward", "grad_in_forward_ones", "v1"):
                ms, gb_s, fraction = row[label]
                assert ms > 0 and gb_s > 0 and fraction > 0, (dtype, kind, label, row[label])
            assert row["grad_in_forward_vs_recompute_grad"][2] and row["v1_vs_recompute_grad"][2]
    assert result["sections"]["logits_tp_fp32"]["kinds"]["jsd"]["triton_padding_grad_zero"] is True
    table = (tmp_path / "out_bandwidth.md").read_text().splitlines()
    assert len([line for line in table if line.startswith("| float32") or line.startswith("| bfloat16")]) == 6
