"""The trainer and the rollout engine on a GPU: the CUDA path that no CPU test can check.

    python3 benchmarks/gpu_trainer.py --out "$OUT/gpu_trainer.json"

The CPU compatibility layer maps every CUDA device to the CPU, so a tensor left on the wrong device is invisible to
the CPU suite. This script runs, in one process (world size 1, NCCL), each section recorded even if another fails:

1. ``trainer_dense``: ``--steps`` X-OPD steps of the real trainer with tiny random Llama student and teacher and
   cached speech features (the test suite's setup, ``tests/_trainer_setup.py``): losses finite, ``kl_cm`` and
   ``kl_im`` logged; step time, the share of it that rollouts take, and ``torch.cuda.max_memory_allocated``.
2. ``trainer_moe``: the same with tiny random Qwen3-MoE student and teacher (``family: qwen3_moe``), recorded as an
   error where the MoE family is not available.
3. ``rollout``: our KV-cached engine vs ``transformers``' ``generate`` on SmolLM2-135M's shape (random weights,
   float32, greedy, no stop token), ``--prompts`` x ``--new-tokens``: tokens/s of each and whether the tokens match.
4. ``save_resume_bf16``: bf16 dense, 3 steps uninterrupted (synchronous saves) against 2 steps with an
   asynchronous save (megatron-core's, CUDA only) resumed for the third (synchronous save): the resumed run logs
   steps 1-3 and its step 3 equals the uninterrupted one (bf16 tolerance).
5. ``sdpa_attention``: ``benchmarks/bench_attention.py`` in bf16 at s = 4096 (the local spec's SDPA training
   attention vs megatron's unfused one: time, peak memory, output agreement).
6. ``fp8``: with Transformer Engine importable, one X-OPD step (its rollout and training) of an FP8 (``hybrid``)
   bf16 student; without TE it says so and is skipped.
7. ``offload_linear``: bf16, 2 steps of the linear-form reverse KL with ``trainer.offload_teacher`` (the teacher
   in pinned host memory outside its phase, its head shard kept on the device for the loss).
8. ``multi_gpu``: with 2 or more GPUs, a TP=2 dense step and an EP=2 MoE step over NCCL (``run_distributed``)
   against the single-GPU step; skipped, saying so, on one GPU.

Every trainer section reports ``logprob_gap_mean``/``_max`` of its first step (the rollout's log-probs against
the training forward's, same weights): fp32 for ``trainer_dense``, bf16 for ``trainer_moe`` and
``save_resume_bf16``.

Prints ONE JSON line (and writes it to ``--out`` after every section). Exit 0 when every section passed, 1 when
one failed, 2 without CUDA. ``--allow-cpu`` runs a tiny version on the CPU, to test the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402


def _config(tmp: Path, steps: int, llm: dict | None, **sections) -> dict:
    from tests._trainer_setup import run_config, tiny_llm, write_feature_cuts

    manifest = write_feature_cuts(tmp)
    model = {"student": {"llm": tiny_llm(**(llm or {}))}, "teacher": {"llm": tiny_llm(**(llm or {}))}}
    trainer = {"max_steps": steps, **sections.pop("trainer", {})}
    return run_config(tmp, manifest, trainer=trainer, model=model, **sections)


def _gap(row: dict) -> dict:
    return {"logprob_gap_mean": row.get("logprob_gap_mean"), "logprob_gap_max": row.get("logprob_gap_max")}


def _trainer(tmp: Path, steps: int, llm: dict | None, save: bool = True) -> dict:
    """Run ``steps`` trainer steps; the metrics of the last, the time per step and the peak memory. Without
    ``save`` no checkpoint is written (``save_resume_bf16`` checks bf16 saves)."""
    from tests._trainer_setup import train

    cfg = _config(tmp, steps, llm, **({} if save else {"checkpoint": {"dir": None}}))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    rows = train(cfg)
    wall = time.perf_counter() - start
    if len(rows) != steps:
        raise RuntimeError(f"{len(rows)} metric rows for {steps} steps")
    finite = all(math.isfinite(r["loss"]) for r in rows)
    logged = all("kl_cm" in r and "kl_im" in r for r in rows)
    return {
        "ok": finite and logged,
        "losses_finite": finite,
        "kl_logged": logged,
        "loss": [round(r["loss"], 5) for r in rows],
        "kl_cm": [round(r["kl_cm"], 5) for r in rows],
        "wall_s_per_step": round(wall / steps, 3),
        # the share of a step that rollouts take (metrics.jsonl's time_rollout_s / time_step_s, steps after the first)
        "rollout_share": round(sum(r.get("time_rollout_s", 0.0) for r in rows[1:] or rows)
                               / max(sum(r.get("time_step_s", 0.0) for r in rows[1:] or rows), 1e-9), 3),
        "peak_mem_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        **_gap(rows[0]),
    }


MOE_LLM = dict(family="qwen3", num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, params_dtype="bfloat16")
BF16 = dict(params_dtype="bfloat16")
# The metrics that must agree between a resumed run or another layout and the reference (not the timings).
_COMPARED = ("loss", "kl_cm", "kl_im", "L_im", "L_cm", "response_len_cm", "response_len_im", "grad_norm")


def _agree(a: dict, b: dict, rel: float) -> dict:
    """Per compared metric, the relative difference; ``ok`` when all are within ``rel`` (NaN equals NaN)."""
    diffs = {}
    for key in _COMPARED:
        x, y = a.get(key), b.get(key)
        if x is None or y is None or (math.isnan(x) and math.isnan(y)):
            continue
        diffs[key] = abs(x - y) / max(abs(y), 1e-6)
    return {"ok": all(d <= rel for d in diffs.values()), "rel_diff": {k: float(f"{d:.3g}") for k, d in diffs.items()}}


def _save_resume(tmp: Path) -> dict:
    """bf16: 3 steps uninterrupted vs 2 steps (asynchronous save) + a resumed third (synchronous save)."""
    from megatron_xopd.trainer.checkpoint import latest_checkpoint
    from tests._trainer_setup import train

    full = train(_config(tmp / "full", 3, BF16, checkpoint={"save_every": 1}))
    start = time.perf_counter()
    first = train(_config(tmp / "split", 2, BF16, checkpoint={"save_every": 2, "async_save": True}))
    async_s = time.perf_counter() - start
    saved = latest_checkpoint(tmp / "split" / "ckpt")
    resumed = train(_config(tmp / "split", 3, BF16, checkpoint={"save_every": 1}))
    steps = [r["step"] for r in resumed]
    agree = _agree(resumed[-1], full[-1], 2e-2) if len(resumed) == 3 and len(full) == 3 else {"ok": False}
    return {
        "ok": steps == [1, 2, 3] and [r["step"] for r in first] == [1, 2] and saved is not None
        and saved.name == "step_0000002" and agree["ok"],
        "async_checkpoint": None if saved is None else saved.name, "async_run_s": round(async_s, 1),
        "resumed_steps": steps, "step3_resumed_vs_full": agree, "save_s": [r.get("save_s") for r in full],
        **_gap(full[0]),
    }


def _sdpa_attention(small: bool) -> dict:
    """``bench_attention.py`` in bf16 (float32 on the CPU smoke run) at s = 4096 (256 on CPU)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--json", "--reps", "3",
           "--dtype", "float32" if small else "bfloat16", "--seq", "256" if small else "4096"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        return {"ok": False, "error": proc.stderr[-1500:]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"ok": res["checksum_rel_diff"] <= (1e-4 if small else 2e-2), **res}


def _fp8(tmp: Path, small: bool) -> dict:
    """One FP8 step (rollout and training) where Transformer Engine can run it."""
    from megatron_xopd.models.gpt import transformer_engine_usable
    from tests._trainer_setup import train

    if not transformer_engine_usable():
        return {"ok": True, "skipped": "Transformer Engine is not importable (or no CUDA): no FP8 step was run"}
    rows = train(_config(tmp, 1, dict(params_dtype="bfloat16", fp8="hybrid"), checkpoint={"dir": None}))
    finite = len(rows) == 1 and math.isfinite(rows[0]["loss"])
    return {"ok": finite, "loss": rows[0]["loss"] if rows else None, "response_len_cm": rows[0].get("response_len_cm")
            if rows else None, **(_gap(rows[0]) if rows else {})}


def _offload_linear(tmp: Path) -> dict:
    """bf16, ``trainer.offload_teacher`` (pinned host copy, one copy in per phase) with the linear-form reverse KL
    (the teacher's head shard kept on the device; the Triton gradient written over the logits chunks), 2 steps."""
    from tests._trainer_setup import train

    cfg = _config(tmp, 2, BF16, trainer={"offload_teacher": True}, xopd={"loss": "reverse_kl"}, checkpoint={"dir": None})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rows = train(cfg)
    finite = len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    return {"ok": finite, "loss": [round(r["loss"], 5) for r in rows],
            "time_teacher_s": [round(r["time_teacher_s"], 3) for r in rows],
            "time_train_s": [round(r["time_train_s"], 3) for r in rows],
            "peak_mem_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None}


def _multi_gpu(tmp: Path) -> dict:
    """TP=2 (dense) and EP=2 (MoE) steps over NCCL against the single-GPU step, on two GPUs."""
    from megatron_xopd.testing import run_distributed
    from tests._trainer_setup import train

    gpus = torch.cuda.device_count()
    if gpus < 2:
        return {"ok": True, "skipped": f"needs 2 or more GPUs, found {gpus}: no TP=2 / EP=2 step was run"}
    out: dict = {"ok": True}
    layouts = {"tp2": (None, {"tensor_model_parallel_size": 2}), "ep2": (MOE_LLM, {"expert_model_parallel_size": 2})}
    for name, (llm, parallel) in layouts.items():
        nosave = {"dir": None}
        one = run_distributed(train, 1, _config(tmp / f"{name}_1", 2, llm, checkpoint=nosave))[0]
        two = run_distributed(train, 2, _config(tmp / f"{name}_2", 2, llm, trainer={"parallel": parallel},
                                                checkpoint=nosave))[0]
        # bf16 MoE: other reduction orders over two GPUs
        agree = _agree(two[-1], one[-1], 2e-2 if llm else 1e-3) if len(one) == len(two) == 2 else {"ok": False}
        out[name] = agree
        out["ok"] = out["ok"] and agree["ok"]
    return out


def _rollout(prompts: int, new_tokens: int, small: bool) -> dict:
    """Our engine against ``generate`` on the same weights, on this process's device."""
    import bench_rollout

    from megatron_xopd.rollout import RolloutEngine, SamplingParams

    if small:  # --allow-cpu: a 2-layer model of the same family
        bench_rollout.SMOLLM2_SHAPE.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                           num_attention_heads=4, num_key_value_heads=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = bench_rollout._hf_model("random").to(device)
    model, cfg = bench_rollout._megatron_model(hf.cpu())
    hf.to(device)
    model.to(device)
    engine = RolloutEngine(model, cfg.text_vocab_size)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.text_vocab_size, (prompts, 32), generator=gen)
    params = SamplingParams(max_new_tokens=new_tokens, greedy=True)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def run_hf() -> torch.Tensor:
        x = ids.to(device)
        with torch.no_grad():
            out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return out[:, ids.shape[1]:].cpu()

    engine.generate(ids.tolist(), SamplingParams(max_new_tokens=4, greedy=True))  # warm-up
    run_hf()
    times: dict[str, float] = {}
    for name, fn in (("ours", lambda: engine.generate(ids.tolist(), params).tokens.cpu()), ("hf", run_hf)):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times[name] = time.perf_counter() - start
        times[name + "_tokens"] = out
    n = prompts * new_tokens
    match = bool(torch.equal(times["ours_tokens"], times["hf_tokens"]))
    return {"ok": True, "ours_tok_s": round(n / times["ours"], 1), "hf_tok_s": round(n / times["hf"], 1),
            "ours_over_hf": round(times["hf"] / times["ours"], 3), "tokens_match_hf": match}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="also write the JSON line here")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    p.add_argument("--allow-cpu", action="store_true", help="tiny run on the CPU, to test this script")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="skip sections not started by then")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(json.dumps({"ok": False, "error": "no CUDA device"}))
        return 2
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    from _sections import device_header, run_sections

    result = device_header()
    small = args.allow_cpu and not torch.cuda.is_available()
    sections = {
        "trainer_dense": lambda tmp: _trainer(tmp, args.steps, None),
        "trainer_moe": lambda tmp: _trainer(tmp, args.steps, MOE_LLM, save=False),
        "rollout": lambda tmp: _rollout(args.prompts, 4 if small else args.new_tokens, small),
        "save_resume_bf16": _save_resume,
        "offload_linear": _offload_linear,
        "sdpa_attention": lambda tmp: _sdpa_attention(small),
        "fp8": lambda tmp: _fp8(tmp, small),
        "multi_gpu": _multi_gpu,
    }
    deadline = time.perf_counter() + args.budget_s

    def section(fn: Callable[[Path], dict]) -> Callable[[int], dict]:
        def run(_left: int) -> dict:
            if time.perf_counter() > deadline:
                return {"ok": True, "skipped": "budget (--budget-s)"}
            with tempfile.TemporaryDirectory() as tmp:
                return fn(Path(tmp))
        return run

    return run_sections(result, {name: section(fn) for name, fn in sections.items()}, args.skip, args.out)

if __name__ == "__main__":
    sys.exit(main())
