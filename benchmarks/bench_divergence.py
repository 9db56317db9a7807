"""Forward + backward of the per-token reverse KL: our chunked path vs the naive full-vocabulary path.

    python benchmarks/bench_divergence.py --tokens 2048 --vocab 151936 --json

``--form logits`` (default) differentiates w.r.t. student logits [N, V] (``vocab_parallel_divergence`` vs
``log_softmax`` + ``kl_div``); ``--form linear`` starts from hidden states and output-layer weights
(``fused_linear_divergence_loss``, the trainer's op, which takes the gradients in its forward, vs building both
full logits tensors first). Both differentiate the sum of the per-token divergences. TP = 1, float32.

Peak memory is the memory above the inputs: on CPU each path runs in a fresh subprocess that reports its peak
RSS (``VmHWM``, reset after the inputs are allocated) minus its RSS then; on CUDA it is
``torch.cuda.max_memory_allocated`` minus the allocated memory after the inputs. Both peaks include the
gradients, which both paths produce. Times (wall, and the process's CPU time, which other processes' load
disturbs less) are the median of ``--repeats`` runs after one warm-up run. CPU subprocesses run with
``OMP_WAIT_POLICY=PASSIVE`` unless it is set (see ``main``).

With ``--form linear`` a third subprocess times the four ``[N, H] x [H, V]`` matmuls alone that both paths must do
(student and teacher logits, the gradients of the hidden states and of the head), in the same chunks as the fused
path: ``matmul_floor_ratio`` = that time over the naive path's is the time ratio no exact method that forms the
logits can beat on this device.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from megatron_xopd.ops import fused_linear_divergence_loss, vocab_parallel_divergence
from megatron_xopd.ops.divergence import default_chunk_size

_SAMPLE_ROWS = 16  # gradient rows compared between the paths


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): less at the mercy of other processes than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _inputs(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device).mul_(scale)

    if args.form == "logits":
        return {"student": randn(args.tokens, args.vocab, scale=2.0).requires_grad_(), "teacher": randn(
            args.tokens, args.vocab, scale=2.0
        )}
    scale = args.hidden**-0.5 * 2.0  # logits of std ~2
    return {
        "h_s": randn(args.tokens, args.hidden).requires_grad_(),
        "w_s": randn(args.vocab, args.hidden, scale=scale).requires_grad_(),
        "h_t": randn(args.tokens, args.hidden),
        "w_t": randn(args.vocab, args.hidden, scale=scale),
    }


def _naive_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    log_q = F.log_softmax(student, dim=-1)
    log_p = F.log_softmax(teacher, dim=-1)
    # kl_div(input, target) = sum exp(target) (target - input) = KL(student || teacher) here.
    return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)


def _step(path: str, args: argparse.Namespace, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token divergences and their sum (the loss differentiated)."""
    if args.form == "logits":
        if path == "fused":
            value = vocab_parallel_divergence(x["student"], x["teacher"], "reverse_kl", chunk_size=args.chunk_size)
        else:
            value = _naive_kl(x["student"], x["teacher"].detach())
        return value, value.sum()
    if path == "fused":
        ones = torch.ones(args.tokens, device=x["h_s"].device)
        loss, value = fused_linear_divergence_loss(
            x["h_s"], x["w_s"], x["h_t"], x["w_t"], "reverse_kl", ones, chunk_size=args.chunk_size
        )
        return value, loss
    with torch.no_grad():
        teacher = x["h_t"] @ x["w_t"].t()
    value = _naive_kl(x["h_s"] @ x["w_s"].t(), teacher)
    return value, value.sum()


def _matmul_floor(args: argparse.Namespace, device: torch.device) -> dict:
    """Median time of the linear form's four head matmuls per chunk, nothing else."""
    x = {k: v.detach() for k, v in _inputs(args, device).items()}
    chunk = default_chunk_size(args.chunk_size, args.vocab, device, linear=True)
    s = torch.empty(chunk, args.vocab, device=device)
    t = torch.empty(chunk, args.vocab, device=device)
    grad_h, grad_w = torch.empty_like(x["h_s"]), torch.zeros_like(x["w_s"])
    times, cpu_times = [], []
    for _ in range(args.repeats + 1):
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        for lo in range(0, args.tokens, chunk):
            h_s, h_t = x["h_s"][lo : lo + chunk], x["h_t"][lo : lo + chunk]
            c = h_s.shape[0]
            torch.mm(h_s, x["w_s"].t(), out=s[:c])
            torch.mm(h_t, x["w_t"].t(), out=t[:c])
            torch.mm(s[:c], x["w_s"], out=grad_h[lo : lo + c])
            grad_w.addmm_(s[:c].t(), h_s)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(_cpu_seconds() - cpu_start)
    return {"s": statistics.median(times[1:]), "cpu_s": statistics.median(cpu_times[1:])}


def _run(path: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Time ``path`` and measure its peak memory above the inputs; keep its outputs for the comparison."""
    x = _inputs(args, device)
    params = [v for v in x.values() if v.requires_grad]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_kib("VmRSS") * 1024
        if not _reset_peak_rss():
            base = _status_kib("VmHWM") * 1024  # no reset: the peak so far is the inputs' own
    times, cpu_times = [], []
    for _ in range(args.repeats + 1):
        for p in params:
            p.grad = None
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        value, loss = _step(path, args, x)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(_cpu_seconds() - cpu_start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kib("VmHWM") * 1024 - base
    rows = torch.linspace(0, args.tokens - 1, _SAMPLE_ROWS, device=device).long()
    grads = [params[0].grad[rows]] + [p.grad[: _SAMPLE_ROWS * 64] for p in params[1:]]
    return {
        "peak_mb": peak / 2**20,
        "s": statistics.median(times[1:]),
        "cpu_s": statistics.median(cpu_times[1:]),
        "value": value.detach().cpu(),
        "grads": [g.cpu() for g in grads],
    }


def _run_in_subprocess(path: str, argv: list[str], env: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        subprocess.run([sys.executable, __file__, *argv, "--worker", path, "--out", out], check=True, env=env)
        return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--form", choices=["logits", "linear"], default="logits")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size for --form linear")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: the ops' default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--worker", choices=["fused", "naive", "matmul"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker:
        torch.save(_matmul_floor(args, device) if args.worker == "matmul" else _run(args.worker, args, device), args.out)
        return
    linear = args.form == "linear"
    if device.type == "cpu":
        argv = [a for a in sys.argv[1:] if a != "--json"]
        # OpenMP threads that spin at barriers waste whole time slices when other processes share the cores;
        # the chunked path runs many short parallel regions and would measure the machine's load, not its own.
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        fused, naive = (_run_in_subprocess(path, argv, env) for path in ("fused", "naive"))
        floor = _run_in_subprocess("matmul", argv, env) if linear else None
    else:
        fused = _run("fused", args, device)
        gc.collect()
        torch.cuda.empty_cache()
        naive = _run("naive", args, device)
        floor = _matmul_floor(args, device) if linear else None
    result = {
        "tokens": args.tokens,
        "vocab": args.vocab,
        "form": args.form,
        "device": str(device),
        "chunk_size": default_chunk_size(args.chunk_size, args.vocab, device, linear=linear),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE") if device.type == "cpu" else None,
        "fused_peak_mb": round(fused["peak_mb"], 1),
        "naive_peak_mb": round(naive["peak_mb"], 1),
        "peak_ratio": round(fused["peak_mb"] / naive["peak_mb"], 3),
        "fused_s": round(fused["s"], 4),
        "naive_s": round(naive["s"], 4),
        "time_ratio": round(fused["s"] / naive["s"], 3),
        "fused_cpu_s": round(fused["cpu_s"], 4),
        "naive_cpu_s": round(naive["cpu_s"], 4),
        "max_abs_err": (fused["value"] - naive["value"]).abs().max().item(),
        "max_abs_grad_err": max((a - b).abs().max().item() for a, b in zip(fused["grads"], naive["grads"])),
    }
    if linear:
        result.update(hidden=args.hidden, matmul_s=round(floor["s"], 4), matmul_cpu_s=round(floor["cpu_s"], 4),
                      matmul_floor_ratio=round(floor["s"] / naive["s"], 3))
    if device.type == "cuda" and args.form == "logits":
        # Reverse KL reads both logits in the forward and again in the backward, and writes the gradient.
        result["fused_gbps"] = round(5 * args.tokens * args.vocab * 4 / fused["s"] / 1e9, 1)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")


if __name__ == "__main__":
    main()
