"""Training attention without Transformer Engine: the local spec's SDPA core attention against megatron-core's
unfused ``DotProductAttention`` ([b, heads, s, s] scores), one layer forward+backward.

    python benchmarks/bench_attention.py --json            # s = 4096, float32, CPU (or CUDA when present)

Each implementation runs in a fresh process (the peak is the process's: ``VmHWM`` on CPU, CUDA's
``max_memory_allocated`` on GPU), on a one-layer GPT (hidden 1024, 8 heads in 4 query groups of 128, SwiGLU
2816, vocabulary 256) built by ``build_gpt_model`` with the local spec; the unfused run swaps each layer's core
attention for megatron's class. Peak is above what the model and inputs hold before the first step. Prints ONE
JSON line: per implementation the median seconds of ``--reps`` forward+backward steps after a warm-up, and the
peak MiB; the output-gradient difference between the two (the same math).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHAPE = dict(num_layers=1, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=8, num_query_groups=4,
             vocab_size=256, make_vocab_size_divisible_by=1, transformer_impl="local")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _run(impl: str, seq: int, batch: int, reps: int, dtype: str) -> dict:
    """One implementation in this (fresh) process: time and peak memory of forward+backward."""
    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_xopd.models.attention import SDPAttention
    from megatron_xopd.models.config import GPTModelConfig
    from megatron_xopd.models.gpt import build_gpt_model
    from megatron_xopd.runtime import ParallelConfig, init_distributed, initialize_model_parallel
    from megatron_xopd.runtime.seed import set_seed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    init_distributed()
    initialize_model_parallel(ParallelConfig())
    set_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = build_gpt_model(GPTModelConfig(max_position_embeddings=seq, params_dtype=dtype, **SHAPE)).to(device)
    model.train()
    cores = [m for m in model.modules() if isinstance(m, SDPAttention)]
    assert cores, "the local spec's core attention is SDPAttention"
    if impl == "unfused":
        for core in cores:
            core.__class__ = DotProductAttention
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq), generator=gen).to(device)
    pos = torch.arange(seq, device=device)[None].expand(batch, -1)
    upstream = torch.randn(batch, seq, SHAPE["vocab_size"], generator=gen).to(device, model.output_layer.weight.dtype)

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        out = model(ids, pos, None)
        out.backward(upstream)
        if cuda:
            torch.cuda.synchronize()
        return out.detach()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status_kib("VmRSS") * 1024
    out = step()
    peak = (torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024) - base
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    grad = model.embedding.word_embeddings.weight.grad
    return {"impl": impl, "device": device, "s": statistics.median(times), "peak_mib": round(peak / 2**20, 1),
            "checksum": [out.double().sum().item(), grad.double().abs().sum().item()]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="params_dtype")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--impl", choices=("sdpa", "unfused"), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.impl:
        print(json.dumps(_run(args.impl, args.seq, args.batch, args.reps, args.dtype)))
        return
    shape = {k: v for k, v in SHAPE.items() if k != "transformer_impl"}
    results = {"seq": args.seq, "batch": args.batch, "dtype": args.dtype, **shape}
    for impl in ("sdpa", "unfused"):
        cmd = [sys.executable, __file__, "--impl", impl, "--seq", str(args.seq), "--batch", str(args.batch),
               "--reps", str(args.reps), "--dtype", args.dtype]
        with socket.socket() as sock:  # a free port: the caller may hold a process group of its own
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(port)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"{impl}: {proc.stderr[-2000:]}")
        results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
    a, b = results["sdpa"].pop("checksum"), results["unfused"].pop("checksum")
    results["checksum_rel_diff"] = max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b))
    results["peak_ratio_unfused_over_sdpa"] = round(results["unfused"]["peak_mib"] / results["sdpa"]["peak_mib"], 2)
    results["time_ratio_unfused_over_sdpa"] = round(results["unfused"]["s"] / results["sdpa"]["s"], 2)
    if args.json:
        print(json.dumps(results))
    else:
        for impl in ("sdpa", "unfused"):
            print(f"{impl:8s} {results[impl]['s']:.3f} s  peak {results[impl]['peak_mib']} MiB")


if __name__ == "__main__":
    main()
