"""Peak memory of a step's teacher and training passes with the full-vocabulary reverse KL: the logits form
(teacher response logits kept per row, student logits built) against the fused-linear form (hidden states kept,
logits built one token chunk at a time).

    python benchmarks/bench_loss_memory.py --rows 8 --response 128 --vocab 49152 --json

Tiny random models (hidden 64, 2 layers) with a real-size vocabulary, TP = 1, one process per form (gloo,
CPU). Peak is the memory above what the built models and rollouts hold: on CPU the process's peak RSS
(``VmHWM``, reset through ``/proc/self/clear_refs`` before the passes) minus its RSS then; on CUDA
``torch.cuda.max_memory_allocated`` minus the allocated memory then. Times are wall-clock of one step of each
pass on a possibly loaded machine: read them only side by side.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _measure(form: str, rows: int, prompt: int, response: int, vocab: int) -> dict:
    from megatron_xopd.algo import IN_MODAL, LossStats, Rollouts, XOPDConfig, rollout_weights
    from megatron_xopd.models import GPTModelConfig, PerceptionConfig, SpeechStudent, build_teacher
    from megatron_xopd.runtime import set_seed
    from megatron_xopd.trainer.build import wrap_ddp
    from megatron_xopd.trainer.passes import score_with_teacher, train_pass

    set_seed(0)
    llm = dict(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
               num_query_groups=2, max_position_embeddings=prompt + response, init_method_std=0.2)
    student_cfg = GPTModelConfig(vocab_size=vocab + 1, text_vocab_size=vocab, padded_vocab_size=vocab + 64, **llm)
    teacher_cfg = GPTModelConfig(vocab_size=vocab, padded_vocab_size=vocab + 64, **llm)
    perception = PerceptionConfig(source="features", feature_dim=16, nemo={"modality_adapter": {
        "_target_": "nemo.collections.speechlm2.modules.perception.IdentityConnector"}})
    student = SpeechStudent(student_cfg, perception, vocab)
    teacher = build_teacher(teacher_cfg, student_cfg)
    ddp = wrap_ddp(student)
    g = torch.Generator().manual_seed(1)
    lengths = torch.full((rows,), response)
    prompts = [torch.randint(0, vocab, (prompt,), generator=g).tolist() for _ in range(rows)]
    r = Rollouts(modality=torch.full((rows,), IN_MODAL), prompt_index=torch.arange(rows), student_prompts=prompts,
                 teacher_prompts=prompts, responses=torch.randint(0, vocab, (rows, response), generator=g),
                 lengths=lengths, old_logprobs=torch.zeros(rows, response), audio_embeds=[None] * rows)
    cfg = XOPDConfig(lam=1.0, loss="reverse_kl", divergence_form=form)
    r.weights = rollout_weights(lengths, r.modality, cfg, global_rollouts={IN_MODAL: rows, 1: 0},
                                global_tokens={IN_MODAL: float(lengths.sum()), 1: 0})
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        base = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    score_with_teacher(teacher, r, rows, vocab, cfg)
    t1 = time.perf_counter()
    ddp.zero_grad_buffer()
    stats = LossStats()
    train_pass(ddp, r, torch.arange(rows), cfg, rows, vocab, stats)
    t2 = time.perf_counter()
    peak = (torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024) - base
    return {"form": form, "peak_mb": round(peak / 2**20, 1), "teacher_s": round(t1 - t0, 3),
            "train_s": round(t2 - t1, 3), "loss": stats.loss}


def main() -> None:
    from megatron_xopd.testing import run_distributed

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {form: run_distributed(_measure, 1, form, args.rows, args.prompt, args.response, args.vocab, tp=1)[0]
               for form in ("logits", "linear")}
    results["tokens"] = args.rows * args.response
    results["vocab"] = args.vocab
    results["peak_ratio_linear_over_logits"] = round(results["linear"]["peak_mb"] / results["logits"]["peak_mb"], 3)
    if args.json:
        print(json.dumps(results))
    else:
        for form in ("logits", "linear"):
            print(results[form])
        print("peak linear / logits:", results["peak_ratio_linear_over_logits"])


if __name__ == "__main__":
    main()
