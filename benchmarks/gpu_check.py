"""GPU check of the Triton kernels in ``megatron_xopd.ops``: correctness compiled on CUDA, and Triton vs PyTorch timing.

    python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json"

Needs only torch and triton (no Megatron; pytest only for the ``pytest`` section). Sections, in order, each
recorded even if a later one fails or the ``--budget-s`` deadline skips it:

0. ``inplace_repeat``: in a fresh process (no kernel tuned yet), each op twice on the same inputs, compared with
   float64 both times: ``vocab_parallel_divergence`` (gradient recomputed and written in the forward), and the
   fused-linear ops, whose gradient kernel writes over the student logits it reads (the autotuner must restore
   them between its timed runs). The first call per tuning key is the autotuning one; before this section no
   other had tuned these keys.
1. ``pytest``: ``tests/test_ops_triton.py -k cuda`` in a subprocess (the kernel-level checks compiled on CUDA).
2. ``unit``: the same checks (``tests.test_ops_triton._run_checks("cuda")``) in this process, errors recorded.
3. ``bandwidth``: ``vocab_parallel_divergence`` forward+backward at ``--tokens`` x ``--vocab`` (reverse KL, forward
   KL, JSD; float32 and bf16 logits) with the current kernels (gradient recomputed in backward, the default; and
   ``grad_in_forward=True``, with a random upstream gradient and with ones), and with the previous kernels
   (``benchmarks/triton_kernels_v1.py`` in the previous op's chunking): median time, and the achieved bandwidth
   of the least bytes any implementation must move (each input read twice, the gradient written once) as a
   fraction of the device's copy bandwidth (``dst.copy_(src)``, measured first). Target: >= 0.8 (docs/gpu.md).
4. ``logits``: ``vocab_parallel_divergence`` forward and forward+backward for each kind, float32 and bf16 inputs, on
   a full vocabulary (``--tokens`` x ``--vocab``, one rank) and on a TP-style shard (``--vocab / --tp`` local
   columns padded to a multiple of 128, the padding excluded via ``vocab_size``, so chunks are row-strided views).
   Triton vs the chunked PyTorch path (the same op with the dispatch forced), both vs a float64 full-vocabulary
   reference on the first ``--ref-rows`` rows; median time (CUDA events), peak memory above the inputs.
5. ``fused_linear``: ``fused_linear_divergence`` (bf16 hidden states and weights), Triton vs PyTorch.
6. ``naive``: plain ``log_softmax`` reverse KL over the full vocabulary (float32), for scale.
7. ``logprobs``: ``vocab_parallel_logprobs`` with entropy (PyTorch only), vs float64.

Prints ONE JSON line (last line of stdout); ``--out`` also gets it (rewritten after every section). Exit status 0 if
every check passed, 1 if one failed or errored, 2 without CUDA. ``--allow-cpu`` runs a tiny smoke version on CPU
(set ``TRITON_INTERPRET=1``), for testing this script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

KIND_BETAS = (("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3))
TEMPERATURE = 0.9


class Ctx:
    def __init__(self, args: argparse.Namespace, device: str) -> None:
        self.args, self.device, self.cuda = args, device, device == "cuda"
        self.deadline = time.monotonic() + args.budget_s
        self.result: dict = {"ok": True, "sections": {}}
        self.failures: list[str] = []

    def fail(self, name: str) -> None:
        self.result["ok"] = False
        self.failures.append(name)

    def save(self) -> None:
        self.result["failures"] = self.failures
        if self.args.out:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
            with open(self.args.out, "w") as f:
                f.write(json.dumps(self.result) + "\n")

    def left(self) -> float:
        """Seconds left before the ``--budget-s`` deadline."""
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _dispatch(use_triton: bool) -> None:
    """Route ``kernels``' float32 compute path to Triton or to the PyTorch reference (process-wide)."""
    from megatron_xopd.ops import kernels

    kernels._use_triton = lambda x, dtype: use_triton and dtype == torch.float32


class _V1Kernels:
    """The previous kernels (``benchmarks/triton_kernels_v1.py``) behind the current kernel interface, as the
    previous op ran them: selected rows gathered, the gradient zero-filled and then written by the kernel."""

    def __init__(self) -> None:
        from benchmarks import triton_kernels_v1

        self.v1 = triton_kernels_v1

    @staticmethod
    def _gather(s, t, rows):
        return (s, t) if rows is None else (s[rows], t[rows])

    def divergence_stats(self, s, t, inv_temp, kind, rows=None):
        return self.v1.divergence_stats(*self._gather(s, t, rows), inv_temp, kind)

    def jsd_terms(self, s, t, inv_temp, state, beta, rows=None):
        return self.v1.jsd_terms(*self._gather(s, t, rows), inv_temp, state, beta)

    def divergence_grad(self, s, t, inv_temp, state, gscale, kind, beta, out, rows=None):
        s, t = self._gather(s, t, rows)
        if not isinstance(gscale, torch.Tensor):
            gscale = torch.full((s.shape[0],), gscale, device=s.device)
        target = out if rows is None else out.new_zeros(s.shape[0], out.shape[1])
        target.zero_()
        self.v1.divergence_grad(s, t, inv_temp, state, gscale, kind, beta, target[:, : s.shape[1]])
        if rows is not None:
            out[rows] = target


def _use_v1(on: bool) -> None:
    """Swap the previous kernels in for the current ones behind ``kernels``' Triton dispatch (process-wide)."""
    from megatron_xopd.ops import kernels, triton_kernels

    kernels._triton = (lambda: _V1Kernels()) if on else (lambda: triton_kernels)


def _r(x: float | None, digits: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return x if x is None else str(x)
    return float(f"{x:.{digits}g}")


def compare(got: torch.Tensor, want: torch.Tensor, rtol: float, atol_rel_max: float) -> dict:
    """[max abs error, relative L2 error, pass]: pass if all finite and |got - want| <= rtol |want| + atol_rel_max
    max|want| elementwise."""
    got, want = got.double(), want.double().to(got.device)
    diff = (got - want).abs()
    scale = want.abs().max().item()
    finite = bool(torch.isfinite(got).all().item())
    ok = finite and bool((diff <= rtol * want.abs() + atol_rel_max * scale).all().item())
    rel_l2 = (diff.norm() / want.norm().clamp_min(1e-300)).item()
    return [_r(diff.max().item(), 3), _r(rel_l2, 3), ok]


def bench(ctx: Ctx, fn, reps: int) -> dict:
    """[median ms, (max - min) / median in %, peak MiB above what was allocated before] of ``fn`` after a warm-up."""
    fn()
    ctx.sync()
    peak = None
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        del out
    times = []
    for _ in range(reps):
        if ctx.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
        del out
    med = statistics.median(times)
    return [_r(med), _r(100 * (max(times) - min(times)) / med, 2), _r(peak, 5)]


def _inputs(n: int, cols: int, dtype: torch.dtype, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Student ~ 3 N(0,1); teacher = student + 2 N(0,1) (correlated, as distillation logits are); random data."""
    gen = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(n, cols, generator=gen, device=device).mul_(3.0)
    t = torch.randn(n, cols, generator=gen, device=device).mul_(2.0).add_(s)
    return s.to(dtype), t.to(dtype)


# -- sections ---------------------------------------------------------------------------------------------------


def sec_pytest(ctx: Ctx) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ops_triton.py", "-k", "cuda"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(30, ctx.left()))
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    out = {"rc": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-500:]}
    if proc.returncode != 0:
        out["tail"] = (proc.stdout + proc.stderr)[-1500:]
        ctx.fail("pytest")
    return out


def sec_unit(ctx: Ctx) -> dict:
    from tests.test_ops_triton import _run_checks

    res = _run_checks(ctx.device)
    failed = [name for name, (err, tol) in res.items() if not err <= tol]
    for name in failed:
        ctx.fail(f"unit:{name}")
    # err = max(|got - want| - rtol |want|), passing when <= tol; the margin is the largest err / tol.
    return {"n": len(res), "failed": failed, "worst": max(res, key=lambda k: res[k][0] / res[k][1]),
            "err_tol": {k: [_r(e, 2), t] for k, (e, t) in res.items()}}


def _op(kind, beta, vocab_size):
    from megatron_xopd.ops import vocab_parallel_divergence

    def run(s, t, g=None):
        if g is None:
            with torch.no_grad():
                return vocab_parallel_divergence(s, t, kind, beta=beta, temperature=TEMPERATURE, vocab_size=vocab_size)
        x = s.detach().requires_grad_()
        value = vocab_parallel_divergence(x, t, kind, beta=beta, temperature=TEMPERATURE, vocab_size=vocab_size)
        value.backward(g)
        return value.detach(), x.grad

    return run


def _bytes_triton(n: int, cols: int, valid: int, in_bytes: int, kind: str) -> tuple[int, int]:
    """Device-memory traffic of the Triton path: forward reads s and t once (twice for JSD: the second pass needs
    the global normalisers); backward reads s and t and writes the gradient (its padding columns as zeros)."""
    fwd = (2 if kind == "jsd" else 1) * 2 * n * valid * in_bytes
    return fwd, fwd + 2 * n * valid * in_bytes + n * cols * in_bytes


def min_bytes(n: int, cols: int, valid: int, in_bytes: int) -> int:
    """The least traffic of any forward+backward (the issue's yardstick): s and t read twice, the gradient
    (input dtype) written once. Reverse and forward KL move exactly this; JSD reads both inputs a third time."""
    return 2 * 2 * n * valid * in_bytes + n * cols * in_bytes


def copy_bandwidth(ctx: Ctx, numel: int) -> dict:
    """Bytes per second of ``dst.copy_(src)`` (read + write) on float32 tensors of ``numel`` elements."""
    src = torch.randn(numel, device=ctx.device)
    dst = torch.empty_like(src)
    ms = bench(ctx, lambda: dst.copy_(src), max(3, ctx.args.reps))[0]
    return {"numel": numel, "ms": ms, "gb_s": _r(2 * numel * 4 / (ms * 1e-3) / 1e9)}


def sec_bandwidth(ctx: Ctx, n: int, cols: int) -> dict:
    """Forward+backward time of the current and previous kernels over the full vocabulary, as achieved bandwidth
    (least bytes / time) over the copy bandwidth."""
    copy = copy_bandwidth(ctx, n * cols)
    out = {"shape": [n, cols], "copy": copy, "legend": "[median_ms, achieved GB/s of min_bytes, fraction of copy]"}
    g = torch.randn(n, generator=torch.Generator(device=ctx.device).manual_seed(7), device=ctx.device)
    ones = torch.ones(n, device=ctx.device)
    old_chunk = max(1, (1 << 26) // cols)  # the previous op's CUDA chunk
    _dispatch(True)
    for dtype in (torch.float32, torch.bfloat16):
        s, t = _inputs(n, cols, dtype, ctx.device, seed=cols + n)
        need = min_bytes(n, cols, cols, s.element_size())
        name = str(dtype).split(".")[1]
        rows = min(ctx.args.ref_rows, n)
        grad_tol = (1e-2, 1e-2) if dtype == torch.bfloat16 else (1e-4, 1e-5)
        out[name] = {"min_bytes": need}
        for kind, beta in KIND_BETAS:
            if ctx.left() <= 0:
                out[name][kind] = "skipped (budget)"
                continue
            runs = {
                "recompute": (g, {}),
                "grad_in_forward": (g, {"grad_in_forward": True}),
                "grad_in_forward_ones": (ones, {"grad_in_forward": True}),
                "v1": (g, {"chunk_size": old_chunk}),
            }
            res, first_rows = {}, {}
            for label, (upstream, opts) in runs.items():
                _use_v1(label == "v1")
                try:
                    first_rows[label] = _fwd_bwd(s, t, upstream, kind, beta, opts)[:rows].clone()
                    ms = bench(ctx, lambda: _fwd_bwd(s, t, upstream, kind, beta, opts), ctx.args.reps)[0]
                finally:
                    _use_v1(False)
                gb_s = need / (ms * 1e-3) / 1e9 if ms else None
                res[label] = [ms, _r(gb_s), _r(gb_s / copy["gb_s"], 3) if gb_s and copy["gb_s"] else None]
            res["speedup_vs_v1"] = _r(res["v1"][0] / res["recompute"][0], 3) if res["recompute"][0] else None
            # Every variant's gradient (first rows) against the default's: the same math, other kernels/orders.
            for label in ("grad_in_forward", "v1"):
                res[f"{label}_vs_recompute_grad"] = c = compare(first_rows[label], first_rows["recompute"], *grad_tol)
                if not c[2]:
                    ctx.fail(f"bandwidth:{name}:{kind}:{label}")
            ones_scaled = first_rows["grad_in_forward_ones"] * g[:rows, None].to(dtype)
            res["ones_times_g_vs_recompute_grad"] = c = compare(ones_scaled, first_rows["recompute"], *grad_tol)
            if not c[2]:
                ctx.fail(f"bandwidth:{name}:{kind}:ones")
            out[name][kind] = res
        del s, t
        if ctx.cuda:
            torch.cuda.empty_cache()
    return out


def bandwidth_table(res: dict) -> str:
    """The bandwidth section as a markdown table: time and fraction of the copy bandwidth per variant."""
    labels = ("recompute", "grad_in_forward", "grad_in_forward_ones", "v1")
    lines = [
        f"Forward+backward at {res['shape'][0]} x {res['shape'][1]}; copy bandwidth {res['copy']['gb_s']} GB/s; "
        "ms (fraction of copy bandwidth achieved on the least bytes: inputs read twice, gradient written once).",
        "",
        "| dtype | kind | " + " | ".join(labels) + " | speedup vs v1 |",
        "|" + "---|" * (len(labels) + 3),
    ]
    for dtype in ("float32", "bfloat16"):
        for kind, row in res.get(dtype, {}).items():
            if not isinstance(row, dict):
                continue
            cells = [f"{row[label][0]} ({row[label][2]})" for label in labels]
            lines.append(f"| {dtype} | {kind} | " + " | ".join(cells) + f" | {row['speedup_vs_v1']} |")
    return "\n".join(lines) + "\n"


def _fwd_bwd(s, t, g, kind, beta, opts):
    from megatron_xopd.ops import vocab_parallel_divergence

    x = s.detach().requires_grad_()
    value = vocab_parallel_divergence(x, t, kind, beta=beta, temperature=TEMPERATURE, **opts)
    value.backward(g)
    return x.grad


def sec_logits(ctx: Ctx, name: str, n: int, cols: int, vocab_size: int, dtype: torch.dtype) -> dict:
    from tests import _ops_reference as ref

    args = ctx.args
    s, t = _inputs(n, cols, dtype, ctx.device, seed=cols + n)
    g = torch.randn(n, generator=torch.Generator(device=ctx.device).manual_seed(7), device=ctx.device)
    rows = min(args.ref_rows, n)
    grad_tol = (1e-2, 1e-2) if dtype == torch.bfloat16 else (1e-4, 1e-5)
    out = {"shape": [n, cols], "vocab_size": vocab_size, "dtype": str(dtype).split(".")[1], "kinds": {}}
    for kind, beta in KIND_BETAS:
        if ctx.left() <= 0:
            out["kinds"][kind] = "skipped (budget)"
            continue
        run = _op(kind, beta, vocab_size)
        want_v, want_g = ref.reference_grad(
            lambda x: ref.divergence(x, t[:rows], kind, beta=beta, temperature=TEMPERATURE, vocab_size=vocab_size),
            s[:rows],
            g[:rows],
        )
        res, got = {}, {}
        for impl in ("triton", "torch"):
            _dispatch(impl == "triton")
            value, grad = run(s, t, g)
            got[impl] = (value, grad)
            res[f"{impl}_vs_f64_value"] = compare(value[:rows], want_v, 1e-4, 1e-5)
            res[f"{impl}_vs_f64_grad"] = compare(grad[:rows], want_g, *grad_tol)
            if vocab_size < cols:
                res[f"{impl}_padding_grad_zero"] = bool((grad[:, vocab_size:] == 0).all().item())
            res[f"{impl}_fwd"] = bench(ctx, lambda: run(s, t), args.reps)
            res[f"{impl}_fwd_bwd"] = bench(ctx, lambda: run(s, t, g), args.reps)
            del value, grad
        res["triton_vs_torch_value"] = compare(got["triton"][0], got["torch"][0], 1e-4, 1e-5)
        res["triton_vs_torch_grad"] = compare(got["triton"][1], got["torch"][1], *grad_tol)
        del got
        fwd_b, all_b = _bytes_triton(n, cols, vocab_size, s.element_size(), kind)
        for key, b in (("fwd", fwd_b), ("fwd_bwd", all_b)):
            ms = res[f"triton_{key}"][0]
            res[f"triton_{key}_gb_s"] = _r(b / (ms * 1e-3) / 1e9) if ms else None
            res[f"speedup_{key}"] = _r(res[f"torch_{key}"][0] / ms, 3) if ms else None
        for key, val in res.items():
            if isinstance(val, list) and len(val) == 3 and val[2] is False or val is False:
                ctx.fail(f"{name}:{kind}:{key}")
        out["kinds"][kind] = res
        if ctx.cuda:
            torch.cuda.empty_cache()
    _dispatch(True)
    return out


def sec_fused_linear(ctx: Ctx, n: int, hidden: int, vocab: int) -> dict:
    from megatron_xopd.ops import fused_linear_divergence

    gen = torch.Generator(device=ctx.device).manual_seed(11)
    dtype = torch.bfloat16

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=ctx.device) * scale).to(dtype)

    h_s, h_t = rnd(n, hidden), rnd(n, hidden)
    w_s, w_t = rnd(vocab, hidden, scale=hidden**-0.5 * 3), rnd(vocab, hidden, scale=hidden**-0.5 * 3)
    g = torch.randn(n, generator=gen, device=ctx.device)
    out = {"shape": {"tokens": n, "hidden": hidden, "vocab": vocab}, "dtype": "bfloat16", "kind": "reverse_kl"}

    def run():
        hs, ws = h_s.detach().requires_grad_(), w_s.detach().requires_grad_()
        value = fused_linear_divergence(hs, ws, h_t, w_t, "reverse_kl", temperature=TEMPERATURE)
        value.backward(g)
        return value.detach(), hs.grad, ws.grad

    got = {}
    for impl in ("triton", "torch"):
        _dispatch(impl == "triton")
        got[impl] = run()
        out[f"{impl}_fwd_bwd"] = bench(ctx, run, max(1, ctx.args.reps // 2))
    _dispatch(True)
    for i, part in enumerate(("value", "grad_h", "grad_w")):
        c = compare(got["triton"][i], got["torch"][i], 1e-4, 1e-5)
        if part != "value":
            # bf16 gradients of bf16 matrix products: rounding differs elementwise, so judge by the relative L2.
            c[2] = isinstance(c[1], float) and c[1] <= 1e-2
        out[f"triton_vs_torch_{part}"] = c
        if not c[2]:
            ctx.fail(f"fused_linear:{part}")
    ms = out["triton_fwd_bwd"][0]
    out["speedup_fwd_bwd"] = _r(out["torch_fwd_bwd"][0] / ms, 3) if ms else None
    return out


def sec_naive(ctx: Ctx, n: int, vocab: int) -> dict:
    s, t = _inputs(n, vocab, torch.float32, ctx.device, seed=3)
    g = torch.randn(n, generator=torch.Generator(device=ctx.device).manual_seed(7), device=ctx.device)

    def run():
        x = s.detach().requires_grad_()
        log_q = torch.log_softmax(x / TEMPERATURE, -1)
        log_p = torch.log_softmax(t / TEMPERATURE, -1)
        value = (log_q.exp() * (log_q - log_p)).sum(-1)
        value.backward(g)
        return x.grad

    return {"shape": [n, vocab], "kind": "reverse_kl", "dtype": "float32", "fwd_bwd": bench(ctx, run, ctx.args.reps)}


def sec_logprobs(ctx: Ctx, n: int, vocab: int) -> dict:
    from megatron_xopd.ops import vocab_parallel_logprobs
    from tests import _ops_reference as ref

    s, _ = _inputs(n, vocab, torch.float32, ctx.device, seed=5)
    targets = torch.randint(0, vocab, (n,), generator=torch.Generator(device=ctx.device).manual_seed(1), device=ctx.device)
    rows = min(ctx.args.ref_rows, n)

    def run():
        x = s.detach().requires_grad_()
        lp, ent = vocab_parallel_logprobs(x, targets, temperature=TEMPERATURE, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
        return lp.detach(), ent.detach(), x.grad

    lp, ent, grad = run()
    want_lp, want_ent = ref.logprobs(s[:rows], targets[:rows], TEMPERATURE)
    out = {
        "shape": [n, vocab],
        "dtype": "float32",
        "vs_f64_logprob": compare(lp[:rows], want_lp, 1e-4, 1e-5),
        "vs_f64_entropy": compare(ent[:rows], want_ent, 1e-4, 1e-5),
        "fwd_bwd": bench(ctx, run, ctx.args.reps),
    }
    for key in ("vs_f64_logprob", "vs_f64_entropy"):
        if not out[key][2]:
            ctx.fail(f"logprobs:{key}")
    return out


def _repeat_child(args: argparse.Namespace) -> dict:
    """``inplace_repeat``'s fresh process: every op twice on the same inputs, each call against float64."""
    from megatron_xopd.ops import fused_linear_divergence, fused_linear_divergence_loss, vocab_parallel_divergence
    from tests import _ops_reference as ref

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, v, hidden = args.tokens, args.vocab, args.hidden
    gen = torch.Generator(device=device).manual_seed(21)
    g = torch.randn(n, generator=gen, device=device)
    out: dict = {"ok": True, "shape": {"tokens": n, "vocab": v, "hidden": hidden}, "legend": "[max_abs, rel_l2, ok]"}

    def judge(name: str, got, want, dtype) -> None:
        # bf16: rounding of the gradient (and of the fused-linear ops' bf16 logits), judged by the relative L2;
        # fp32 head gradients sum n rows. A corrupted gradient is off by about its own size.
        bf16_tol = 5e-2 if name.startswith("fused") else 2e-2
        for part, a, b in zip(("value", "grad", "grad_w"), got, want):
            c = compare(a, b, 1e-4, 1e-5)
            if dtype == torch.bfloat16 or part == "grad_w":
                c[2] = isinstance(c[1], float) and c[1] <= (bf16_tol if dtype == torch.bfloat16 else 1e-4)
            out[f"{name}:{part}"] = c
            out["ok"] = out["ok"] and c[2]

    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[1]
        s, t = _inputs(n, v, dtype, device, seed=31)
        for kind, beta in KIND_BETAS[::2]:  # reverse KL, JSD (the JSD-terms kernel too)
            want = ref.reference_grad(
                lambda x: ref.divergence(x, t.double(), kind, beta=beta, temperature=TEMPERATURE), s, g)
            for where in ("bwd", "fwd"):
                for call in (1, 2):
                    x = s.detach().clone().requires_grad_()
                    value = vocab_parallel_divergence(x, t, kind, beta=beta, temperature=TEMPERATURE,
                                                      grad_in_forward=where == "fwd")
                    value.backward(g)
                    judge(f"logits_{name}_{kind}_{where}_call{call}", (value.detach(), x.grad), want, dtype)
        w_scale = hidden**-0.5 * 3
        h_s, h_t = (torch.randn(n, hidden, generator=gen, device=device).to(dtype) for _ in range(2))
        w_s, w_t = ((torch.randn(v, hidden, generator=gen, device=device) * w_scale).to(dtype) for _ in range(2))
        hs64, ws64 = h_s.double().requires_grad_(), w_s.double().requires_grad_()
        value64 = ref.divergence(hs64 @ ws64.T, h_t.double() @ w_t.double().T, "reverse_kl", temperature=TEMPERATURE)
        (value64 * g.double()).sum().backward()
        want = (value64.detach(), hs64.grad, ws64.grad)
        for op in ("fused_linear", "fused_linear_loss"):
            for call in (1, 2):
                hs, ws = h_s.detach().clone().requires_grad_(), w_s.detach().clone().requires_grad_()
                if op == "fused_linear":
                    value = fused_linear_divergence(hs, ws, h_t, w_t, "reverse_kl", temperature=TEMPERATURE)
                    value.backward(g)
                else:
                    loss, value = fused_linear_divergence_loss(hs, ws, h_t, w_t, "reverse_kl", g,
                                                               temperature=TEMPERATURE)
                    loss.backward()
                judge(f"{op}_{name}_call{call}", (value.detach(), hs.grad, ws.grad), want, dtype)
    return out


def sec_inplace_repeat(ctx: Ctx) -> dict:
    """Run :func:`_repeat_child` in a fresh process (this one may have tuned kernels already)."""
    args = ctx.args
    cmd = [sys.executable, os.path.abspath(__file__), "--repeat-child", "--tokens", str(args.repeat_tokens),
           "--vocab", str(args.repeat_vocab), "--hidden", str(args.repeat_hidden)]
    if not ctx.cuda:
        cmd.append("--allow-cpu")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(60, ctx.left()))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode not in (0, 1) or not lines:
        ctx.fail("inplace_repeat")
        return {"rc": proc.returncode, "tail": (proc.stdout + proc.stderr)[-1500:]}
    res = json.loads(lines[-1])
    failed = [k for k, val in res.items() if isinstance(val, list) and len(val) == 3 and val[2] is not True]
    for name in failed:
        ctx.fail(f"inplace_repeat:{name}")
    if not res.get("ok"):
        ctx.fail("inplace_repeat")
    return {**res, "failed": failed}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="also write the JSON line here")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--tp", type=int, default=4, help="TP size of the partial-vocabulary shard case")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size of the fused-linear case")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--ref-rows", type=int, default=64, help="rows checked against the float64 reference")
    p.add_argument("--budget-s", type=float, default=240.0, help="skip sections not started by then")
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    p.add_argument("--allow-cpu", action="store_true", help="tiny smoke run on CPU (with TRITON_INTERPRET=1)")
    p.add_argument("--repeat-tokens", type=int, default=512, help="tokens of the inplace_repeat section")
    p.add_argument("--repeat-vocab", type=int, default=32768, help="vocabulary of inplace_repeat (4 configs tuned)")
    p.add_argument("--repeat-hidden", type=int, default=512, help="hidden size of inplace_repeat's fused-linear ops")
    p.add_argument("--repeat-child", action="store_true", help=argparse.SUPPRESS)  # inplace_repeat's process
    args = p.parse_args()
    t0 = time.monotonic()
    if args.repeat_child:
        result = _repeat_child(args)
        print(json.dumps(result), flush=True)
        return 0 if result["ok"] else 1

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(json.dumps({"ok": False, "error": "CUDA is not available (torch %s)" % torch.__version__}))
        return 2
    if not cuda:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print(json.dumps({"ok": False, "error": "--allow-cpu needs TRITON_INTERPRET=1"}))
            return 2
        args.tokens, args.vocab, args.hidden, args.reps, args.ref_rows = 4, 256, 32, 1, 4
        args.repeat_tokens, args.repeat_vocab, args.repeat_hidden = 4, 96, 16
    ctx = Ctx(args, "cuda" if cuda else "cpu")
    info = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        ctx.result.update(info, ok=False, error=f"triton import failed: {exc!r}")
        ctx.save()
        print(json.dumps(ctx.result))
        return 1
    if cuda:
        prop = torch.cuda.get_device_properties(0)
        info.update(
            device=prop.name, sms=prop.multi_processor_count, mem_gib=round(prop.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
        from megatron_xopd.ops import kernels

        info["default_dispatch_triton"] = bool(kernels._use_triton(torch.empty(1, device="cuda"), torch.float32))
        if not info["default_dispatch_triton"]:
            ctx.fail("default_dispatch")
    else:
        info["device"] = "cpu (TRITON_INTERPRET smoke run)"
    ctx.result.update(info)
    ctx.result["legend"] = {
        "error": "[max_abs, rel_l2, ok]",
        "time": "[median_ms, spread_pct, peak_mib_above_inputs]",
        "gb_s": "least bytes the Triton path moves / median time",
    }
    ctx.result["config"] = {"tokens": args.tokens, "vocab": args.vocab, "tp": args.tp, "temperature": TEMPERATURE}

    n, v = args.tokens, args.vocab
    # The last rank's shard at TP = --tp: the vocabulary padded to a multiple of 128 per rank (8 in the CPU smoke
    # run); its ``local`` columns end in padding, so only the first ``valid`` are real tokens.
    align = 128 if cuda else 8
    local = -(-v // (args.tp * align)) * align
    valid = v - (args.tp - 1) * local
    if not 0 < valid < local:
        valid = max(1, local - align)
    sections = [
        ("inplace_repeat", lambda: sec_inplace_repeat(ctx)),  # first: a fresh process, nothing tuned before
        ("pytest", lambda: sec_pytest(ctx)),
        ("unit", lambda: sec_unit(ctx)),
        ("bandwidth", lambda: sec_bandwidth(ctx, n, v)),
        ("logits_full_fp32", lambda: sec_logits(ctx, "logits_full_fp32", n, v, v, torch.float32)),
        ("logits_full_bf16", lambda: sec_logits(ctx, "logits_full_bf16", n, v, v, torch.bfloat16)),
        ("logits_tp_fp32", lambda: sec_logits(ctx, "logits_tp_fp32", n, local, valid, torch.float32)),
        ("logits_tp_bf16", lambda: sec_logits(ctx, "logits_tp_bf16", n, local, valid, torch.bfloat16)),
        ("fused_linear", lambda: sec_fused_linear(ctx, n, args.hidden, v)),
        ("naive", lambda: sec_naive(ctx, n, v)),
        ("logprobs", lambda: sec_logprobs(ctx, n, v)),
    ]
    skip = set(filter(None, args.skip.split(",")))
    if not cuda:
        skip.add("pytest")  # its checks skip without CUDA; the interpreted ones are the CPU test suite's
    for name, fn in sections:
        if name in skip:
            ctx.result["sections"][name] = "skipped"
            continue
        if ctx.left() <= 0:
            ctx.result["sections"][name] = "skipped (budget)"
            continue
        t1 = time.monotonic()
        try:
            res = fn()
        except Exception as exc:  # noqa: BLE001 - record and go on with the next section
            res = {"error": repr(exc)[:500], "trace": traceback.format_exc()[-1500:]}
            ctx.fail(name)
        if isinstance(res, dict):
            res["wall_s"] = round(time.monotonic() - t1, 1)
        ctx.result["sections"][name] = res
        ctx.save()
        if cuda:
            torch.cuda.empty_cache()
        print(f"[gpu_check] {name}: {time.monotonic() - t1:.1f}s", file=sys.stderr, flush=True)
    ctx.result["wall_s"] = round(time.monotonic() - t0, 1)
    ctx.save()
    bandwidth = ctx.result["sections"].get("bandwidth")
    if args.out and isinstance(bandwidth, dict) and "copy" in bandwidth:
        with open(os.path.splitext(args.out)[0] + "_bandwidth.md", "w") as f:
            f.write(bandwidth_table(bandwidth))
    print(json.dumps(ctx.result), flush=True)
    return 0 if ctx.result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
