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

Prints ONE JSON line (and writes it to ``--out`` after every section). Exit 0 when every section passed, 1 when
one failed, 2 without CUDA. ``--allow-cpu`` runs a tiny version on the CPU, to test the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402


def _trainer(tmp: Path, steps: int, llm: dict | None) -> dict:
    """Run ``steps`` trainer steps; the metrics of the last, the time per step and the peak memory."""
    from tests._trainer_setup import run_config, tiny_llm, train, write_feature_cuts

    manifest = write_feature_cuts(tmp)
    model = {"student": {"llm": tiny_llm(**(llm or {}))}, "teacher": {"llm": tiny_llm(**(llm or {}))}}
    cfg = run_config(tmp, manifest, trainer={"max_steps": steps}, model=model)
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
        "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
    }


MOE_LLM = dict(family="qwen3_moe", num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, qk_layernorm=True)


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
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(json.dumps({"ok": False, "error": "no CUDA device"}))
        return 2
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    result: dict = {"ok": True, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__, "sections": {}}
    small = args.allow_cpu and not torch.cuda.is_available()
    sections = {
        "trainer_dense": lambda tmp: _trainer(tmp, args.steps, None),
        "trainer_moe": lambda tmp: _trainer(tmp, args.steps, MOE_LLM),
        "rollout": lambda tmp: _rollout(args.prompts, 4 if small else args.new_tokens, small),
    }
    skip = set(filter(None, args.skip.split(",")))
    for name, fn in sections.items():
        if name in skip:
            continue
        start = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                section = fn(Path(tmp))
        except Exception as exc:  # recorded, and the next section still runs
            section = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        section["wall_s"] = round(time.perf_counter() - start, 1)
        result["sections"][name] = section
        result["ok"] = result["ok"] and section["ok"]
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result) + "\n")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
