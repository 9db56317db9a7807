"""The Triton kernels against the PyTorch reference kernels, on CPU under ``TRITON_INTERPRET=1``, and compiled
on CUDA where a GPU is present.

Triton reads ``TRITON_INTERPRET`` when it is imported, and other tests may import it first, so the CPU checks run
in one subprocess (this module run as a script) with the variable set, and report their errors back as JSON. The
CUDA checks (the same ones, on CUDA tensors) run in this process and are skipped without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

_SKIP = 3  # exit code of the subprocess when triton cannot be imported
_KINDS_BETA = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)]
CHECKS = (
    [f"stats-{kind}" for kind, _ in _KINDS_BETA]
    + ["jsd-terms"]
    + [f"grad-{kind}-{dtype}" for kind, _ in _KINDS_BETA for dtype in ("float32", "bfloat16")]
    + [f"op-{kind}-{part}" for kind, _ in _KINDS_BETA for part in ("value", "grad")]
    + [
        f"whole-{kind}-{dtype}-{where}-{part}"
        for kind, _ in _KINDS_BETA
        for dtype in ("float32", "bfloat16")
        for where in ("bwd", "fwd")
        for part in ("value", "grad")
    ]
    + [f"tp2-{kind}-{part}" for kind, _ in _KINDS_BETA for part in ("value", "grad")]
    + ["scale-rows"]
    + [f"autotune-{name}" for name in ("stats", "jsd", "grad", "grad-inplace", "grad-inplace-bf16", "op-linear")]
    + ["autotune-unrestored-corrupts", "autotune-timed-configs"]
)
# The whole-tensor checks: an odd vocabulary (77 real columns of 80, so the interpreter's 32-column blocks end in a
# partial one and the padding must come back as zeros), a masked row, and an upstream gradient of exactly 1 on one
# row (the row grad_in_forward's scale kernel skips).
_WHOLE_N, _WHOLE_COLS, _WHOLE_VOCAB = 5, 80, 77
_WHOLE_MASK = [True, True, False, True, True]


def _chunk(
    seed: int, dtype: torch.dtype, c: int = 3, v: int = 37, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(c, v + 5, generator=gen) * 4).to(device)
    t = (torch.randn(c, v + 5, generator=gen) * 4).to(device)
    return s[:, :v].to(dtype), t[:, :v].to(dtype)  # row-strided views, as the ops pass them


def _state(s: torch.Tensor, t: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """The backward state [c, 5]: max and log Z of both rows, and a statistic (here a made-up positive one)."""
    s, t = s.float() * inv_temp, t.float() * inv_temp
    m_s, m_t = s.amax(1), t.amax(1)
    log_z_s, log_z_t = (s - m_s[:, None]).exp().sum(1).log(), (t - m_t[:, None]).exp().sum(1).log()
    stat = torch.rand(s.shape[0], generator=torch.Generator().manual_seed(5)).to(s.device)
    return torch.stack([m_s, log_z_s, m_t, log_z_t, stat], 1)


def _err(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> tuple[float, float]:
    """(max |got - want| - rtol |want|, atol): the check passes when the first is <= the second."""
    got, want = got.double(), want.double()
    return ((got - want).abs() - rtol * want.abs()).max().item(), atol


@contextlib.contextmanager
def _dispatch(kernels, use_triton: bool):
    """Route :mod:`kernels`' float32 path to Triton (on any device: CPU tensors need ``TRITON_INTERPRET=1``) or to
    the PyTorch reference, and restore the dispatch afterwards."""
    saved = kernels._use_triton
    kernels._use_triton = lambda x, dtype: use_triton and dtype == torch.float32
    try:
        yield
    finally:
        kernels._use_triton = saved


def _run_checks(device: str = "cpu") -> dict[str, tuple[float, float]]:
    from tests import _ops_reference as ref
    from megatron_xopd.ops import kernels, triton_kernels, vocab_parallel_divergence

    results = {}
    work = kernels.Workspace()
    reference = functools.partial(_dispatch, kernels, False)
    s, t = _chunk(0, torch.float32, device=device)
    for kind, beta in _KINDS_BETA:
        got = triton_kernels.divergence_stats(s, t, 0.7, kind)
        with reference():
            want = kernels.divergence_stats(s, t, 0.7, kind, torch.float32, work)
        results[f"stats-{kind}"] = _err(got, want, 1e-5, 1e-5)
    state = _state(s, t, 0.7)
    with reference():
        want = kernels.jsd_terms(s, t, 0.7, state, 0.3, work)
    results["jsd-terms"] = _err(triton_kernels.jsd_terms(s, t, 0.7, state, 0.3), want, 1e-5, 1e-6)

    s, t = _chunk(1, torch.bfloat16, device=device)
    state = _state(s, t, 1.3)
    gscale = torch.randn(3, generator=torch.Generator().manual_seed(2)).to(device)
    for kind, beta in _KINDS_BETA:
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            got, want = (torch.full(s.shape, torch.nan, dtype=dtype, device=device) for _ in range(2))
            triton_kernels.divergence_grad(s, t, 1.3, state, gscale, kind, beta, got)
            with reference():
                kernels.divergence_grad(s, t, 1.3, state, gscale, kind, beta, want, work)
            results[f"grad-{kind}-{str(dtype).split('.')[1]}"] = _err(got, want, tol, tol)

    # The whole op with the Triton kernels on the float32 path (strided chunk views, a mask, padding, temperature).
    s, t = ref.make_logits(5, 23, seed=3)
    mask = torch.tensor([True, False, True, True, True])
    for kind, beta in _KINDS_BETA:
        opts = dict(beta=beta, temperature=1.5, vocab_size=20)
        want, want_grad = ref.reference_grad(lambda x: ref.divergence(x, t, kind, mask=mask, **opts), s)
        x = s.float().to(device).requires_grad_()
        with _dispatch(kernels, True):
            value = vocab_parallel_divergence(x, t.float().to(device), kind, chunk_size=2, mask=mask.to(device), **opts)
            value.sum().backward()
        results[f"op-{kind}-value"] = _err(value.cpu(), want, 1e-4, 1e-5)
        results[f"op-{kind}-grad"] = _err(x.grad.cpu(), want_grad, 1e-4, 1e-5)
    results.update(_whole_checks(device))
    results.update(_tp2_checks(device))
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(8)).to(device)
    got = x.clone()
    # Rows 1, 3, 2 times -2, 0.5, 1 (row 2 skipped: a factor of 1); row 0 not selected.
    factors, rows = torch.tensor([-2.0, 0.5, 1.0], device=device), torch.tensor([1, 3, 2], device=device)
    triton_kernels.scale_rows(got, factors, rows)
    results["scale-rows"] = _err(got, x * torch.tensor([1.0, -2.0, 1.0, 0.5], device=device)[:, None], 0.0, 1e-7)
    results.update(_autotune_checks(device))
    return results


# Enough columns for three of the autotuner's configs to survive its pruning (blocks of 1024, 2048 and 4096).
_TUNE_COLS = 2100


@contextlib.contextmanager
def _autotuning(tk, runs: int = 3):
    """Route every launch through the autotuners (CPU tensors too, interpreted) with a fresh tuning cache, each
    config timed by ``runs`` calls on the caller's buffers (Triton's ``do_bench`` makes tens: the same hazard);
    yields the list of timed configs. Restores the dispatch, the caches and the benchmarkers afterwards."""
    timed: list[int] = []

    def fake_bench(kernel_call, quantiles):
        for _ in range(runs):
            kernel_call()
        timed.append(len(timed))
        return [float(len(timed))] * len(quantiles)  # the first config timed wins

    saved = tk._autotuned, {name: (t.cache, t.__dict__.get("do_bench")) for name, t in tk._TUNED.items()}
    tk._autotuned = lambda x: True
    for tuner in tk._TUNED.values():
        tuner.cache = {}
        tuner.do_bench = fake_bench
    try:
        yield timed
    finally:
        tk._autotuned = saved[0]
        for name, tuner in tk._TUNED.items():
            tuner.cache, bench = saved[1][name]
            if bench is None:
                del tuner.do_bench
            else:
                tuner.do_bench = bench


def _autotune_checks(device: str) -> dict[str, tuple[float, float]]:
    """Autotuned launches on the caller's buffers, every config run several times: each op's result equals the
    fixed-block launch, its inputs are unchanged, and the gradient written over the student logits (the
    fused-linear ops' call) is exact. The control: the same in-place call through an autotuner that does not
    restore ``out_ptr`` is corrupted, so these checks can fail."""
    import triton

    from tests import _ops_reference as ref
    from megatron_xopd.ops import fused_linear_divergence, kernels
    from megatron_xopd.ops import triton_kernels as tk

    results = {}
    s, t = (x.contiguous() for x in _chunk(9, torch.float32, v=_TUNE_COLS, device=device))
    s0, t0 = s.clone(), t.clone()
    state = _state(s, t, 0.8)
    gscale = torch.tensor([0.5, -1.0, 2.0], device=device)
    want_stats = tk.divergence_stats(s, t, 0.8, "reverse_kl")
    want_jsd = tk.jsd_terms(s, t, 0.8, state, 0.3)
    want = torch.empty_like(s)
    tk.divergence_grad(s, t, 0.8, state, gscale, "jsd", 0.3, want)
    unchanged = lambda: bool(torch.equal(s, s0) and torch.equal(t, t0))  # noqa: E731

    with _autotuning(tk) as timed:
        got = tk.divergence_stats(s, t, 0.8, "reverse_kl")
        results["autotune-stats"] = _err(got, want_stats, 1e-6, 1e-6) if unchanged() else (float("inf"), 0.0)
        got = tk.jsd_terms(s, t, 0.8, state, 0.3)
        results["autotune-jsd"] = _err(got, want_jsd, 1e-6, 1e-6) if unchanged() else (float("inf"), 0.0)
        got = torch.full_like(s, torch.nan)
        tk.divergence_grad(s, t, 0.8, state, gscale, "jsd", 0.3, got)
        results["autotune-grad"] = _err(got, want, 1e-6, 1e-7) if unchanged() else (float("inf"), 0.0)
        got = s.clone()  # the gradient written over the student logits it is computed from
        tk.divergence_grad(got, t, 0.8, state, gscale, "jsd", 0.3, got)
        results["autotune-grad-inplace"] = _err(got, want, 1e-6, 1e-7)
        # bf16 logits, reverse KL, a per-row scale given as one number: another tuning key, also in place.
        s16, t16 = s.to(torch.bfloat16), t.to(torch.bfloat16)
        want16 = torch.empty_like(s16)
        tk._KERNELS["grad"][(3,)](s16, t16, s16, state, state, want16, s16.stride(0), t16.stride(0), want16.stride(0),
                                  _TUNE_COLS, _TUNE_COLS, 0.8, 1.5, 0.5, 0.0, 0.0, KIND=0, HAS_ROWS=False,
                                  HAS_G=False, BLOCK=tk.INTERPRET_BLOCK)
        got16 = s16.clone()
        tk.divergence_grad(got16, t16, 0.8, state, 1.5, "reverse_kl", 0.5, got16)
        results["autotune-grad-inplace-bf16"] = _err(got16, want16, 0.0, 0.0)
        # The whole fused-linear op (its gradient is written over the logits chunk) against float64.
        gen = torch.Generator().manual_seed(12)
        h_s, h_t = (torch.randn(6, 16, generator=gen).to(device) for _ in range(2))
        w_s, w_t = (torch.randn(_TUNE_COLS, 16, generator=gen).to(device) * 0.5 for _ in range(2))
        x = h_s.clone().requires_grad_()
        with _dispatch(kernels, True):
            fused_linear_divergence(x, w_s, h_t, w_t, "reverse_kl").sum().backward()
        want_h = ref.reference_grad(
            lambda h: ref.divergence(h @ w_s.double().cpu().T, (h_t @ w_t.T).double().cpu(), "reverse_kl"),
            h_s.double().cpu(),
        )[1]
        results["autotune-op-linear"] = _err(x.grad.cpu(), want_h, 1e-4, 1e-5)
    # Three configs of every tuned key were timed (otherwise nothing above was tuned).
    results["autotune-timed-configs"] = (0.0 if len(timed) >= 3 * 4 else float("inf"), 0.0)

    unrestored = triton.autotune(tk._TUNED["grad"].configs, key=tk._GRAD_KEY,
                                 prune_configs_by={"early_config_prune": tk._fitting})(tk._grad_kernel)
    saved = tk._TUNED["grad_inplace"]
    tk._TUNED["grad_inplace"] = unrestored
    try:
        with _autotuning(tk):
            got = s.clone()
            tk.divergence_grad(got, t, 0.8, state, gscale, "jsd", 0.3, got)
    finally:
        tk._TUNED["grad_inplace"] = saved
    corruption = (got.double() - want.double()).abs().max().item()
    results["autotune-unrestored-corrupts"] = (1e-3 * want.abs().max().item() - corruption, 0.0)
    return results


def _whole_checks(device: str) -> dict[str, tuple[float, float]]:
    """The op on the Triton path with its default chunking (every token in one launch per pass), gradient
    recomputed in backward and written in forward, float32 and bf16 logits, against the float64 reference."""
    from tests import _ops_reference as ref
    from megatron_xopd.ops import kernels, vocab_parallel_divergence

    results = {}
    s, t = ref.make_logits(_WHOLE_N, _WHOLE_COLS, seed=4)
    mask = torch.tensor(_WHOLE_MASK)
    upstream = torch.tensor([1.0, 0.7, 2.0, -1.3, 0.4], dtype=torch.float64)
    for kind, beta in _KINDS_BETA:
        opts = dict(beta=beta, temperature=1.2, vocab_size=_WHOLE_VOCAB)
        for dtype in (torch.float32, torch.bfloat16):
            s_d, t_d = s.to(dtype), t.to(dtype)
            want, want_grad = ref.reference_grad(
                lambda x: ref.divergence(x, t_d.double(), kind, mask=mask, **opts), s_d.double(), upstream
            )
            grad_tol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-2, 1e-2 * want_grad.abs().max().item())
            for where in ("bwd", "fwd"):
                x = s_d.to(device).clone().requires_grad_()
                with _dispatch(kernels, True):
                    value = vocab_parallel_divergence(
                        x, t_d.to(device), kind, mask=mask.to(device), grad_in_forward=where == "fwd", **opts
                    )
                    value.backward(upstream.float().to(device))
                name = f"whole-{kind}-{str(dtype).split('.')[1]}-{where}"
                results[f"{name}-value"] = _err(value.cpu(), want, 1e-4, 1e-5)
                ok = x.grad.dtype == dtype and bool((x.grad[:, _WHOLE_VOCAB:] == 0).all())
                results[f"{name}-grad"] = _err(x.grad.cpu(), want_grad, *grad_tol) if ok else (float("inf"), 0.0)
    return results


def _tp2_checks(device: str) -> dict[str, tuple[float, float]]:
    """The kernels on two vocabulary shards (the second ending in padding), their statistics combined as over a
    TP group of two (max, then rescaled sums), against the float64 full-vocabulary reference."""
    from tests import _ops_reference as ref
    from megatron_xopd.ops import triton_kernels

    results = {}
    n, local, vocab, inv_temp = 4, 40, 75, 1 / 0.9
    s, t = ref.make_logits(n, 2 * local, seed=6)
    upstream = torch.linspace(-1.0, 2.0, n, dtype=torch.float64)
    shards = [(slice(0, local), local), (slice(local, 2 * local), vocab - local)]
    for kind, beta in _KINDS_BETA:
        part = [triton_kernels.divergence_stats(s[:, c][:, :v].float().to(device), t[:, c][:, :v].float().to(device),
                                                inv_temp, kind).double().cpu() for c, v in shards]
        m = torch.maximum(part[0][:, :2], part[1][:, :2])
        factor = [(p[:, :2] - m).exp() for p in part]  # each shard's sums moved to the global maxima
        z = sum(p[:, 2:4] * f for p, f in zip(part, factor))
        expect = sum(p[:, 4] * f[:, 0 if kind == "reverse_kl" else 1] for p, f in zip(part, factor))
        log_z = z.log()
        lse_diff = (m[:, 0] + log_z[:, 0]) - (m[:, 1] + log_z[:, 1])
        state = torch.stack([m[:, 0], log_z[:, 0], m[:, 1], log_z[:, 1], torch.zeros(n, dtype=torch.float64)], 1)
        if kind == "reverse_kl":
            value = state[:, 4] = expect / z[:, 0] - lse_diff
        elif kind == "forward_kl":
            value = expect / z[:, 1] + lse_diff
        else:
            terms = sum(triton_kernels.jsd_terms(s[:, c][:, :v].float().to(device), t[:, c][:, :v].float().to(device),
                                                 inv_temp, state.float().to(device), beta).double().cpu()
                        for c, v in shards)
            value, state[:, 4] = terms[:, 0], terms[:, 1]
        grads = []
        for c, v in shards:
            out = torch.full((n, local), torch.nan, device=device)
            triton_kernels.divergence_grad(s[:, c][:, :v].float().to(device), t[:, c][:, :v].float().to(device),
                                           inv_temp, state.float().to(device), (upstream * inv_temp).float().to(device),
                                           kind, beta, out)
            grads.append(out.cpu())
        want, want_grad = ref.reference_grad(
            lambda x: ref.divergence(x, t, kind, beta=beta, temperature=0.9, vocab_size=vocab), s, upstream
        )
        grad = torch.cat(grads, 1)
        results[f"tp2-{kind}-value"] = _err(value, want, 1e-4, 1e-5)
        padding_zero = bool((grad[:, vocab:] == 0).all())
        results[f"tp2-{kind}-grad"] = _err(grad, want_grad, 1e-4, 1e-5) if padding_zero else (float("inf"), 0.0)
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict[str, list[float]]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_ops_triton"], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode == _SKIP:
        pytest.skip(f"triton cannot be imported: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CHECKS)
def test_triton_kernel_matches_reference(interpreted, name):
    err, tol = interpreted[name]
    assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g}"


def test_every_autotuner_restores_the_buffer_its_kernel_writes():
    """The autotuner times each config by running it on the caller's buffers: every buffer a tuned kernel stores
    to is restored after each run, except by the gradient's out-of-place variant, which ``divergence_grad`` picks
    only when ``out`` shares no memory with the inputs (the interpreted ``autotune-*`` checks run both)."""
    pytest.importorskip("triton")
    from megatron_xopd.ops import triton_kernels as tk

    for name, tuner in tk._TUNED.items():
        written = set(re.findall(r"tl\.store\((\w+)", inspect.getsource(tuner.base_fn)))
        restored = set(tuner.restore_value) | set(tuner.reset_to_zero)
        assert written == {"out_ptr"}, (name, written)
        assert restored == (set() if name == "grad" else written), (name, restored)


# Argument types by name for compiling the kernels ahead of time; "IN" is the logits' dtype.
_ARG_TYPES = {
    "s_ptr": "IN", "t_ptr": "IN", "x_ptr": "IN", "rows_ptr": "*i64", "state_ptr": "*fp32", "g_ptr": "*fp32",
    "s_stride": "i32", "t_stride": "i32", "out_stride": "i32", "stride": "i32", "n_cols": "i32", "n_out_cols": "i32",
    "inv_temp": "fp32", "alpha": "fp32", "beta": "fp32", "log_beta": "fp32", "log_1mbeta": "fp32",
}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["stats", "jsd", "grad", "scale"])
def test_kernel_compiles_for_hopper_vectorised_without_spills(name, dtype):
    """Each kernel compiled ahead of time for sm_90 (no GPU needed) at a tuned config (4096 columns, 8 warps):
    its global loads are 128-bit vectors (aligned rows, as Triton specialises 16-divisible strides at launch) and
    ptxas reports no register spills."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: the kernels are not compilable functions")
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from megatron_xopd.ops import triton_kernels as tk

    kernels = {"stats": tk._stats_kernel, "jsd": tk._jsd_kernel, "grad": tk._grad_kernel, "scale": tk._scale_kernel}
    kernel = kernels[name]
    params = [p.name for p in kernel.params]
    out_type = f"*{dtype}" if name == "grad" else "*fp32"
    signature = {p: "constexpr" if p.isupper() else _ARG_TYPES.get(p, out_type).replace("IN", f"*{dtype}")
                 for p in params}
    constants = {"KIND": 2 if name == "grad" else 0, "HAS_ROWS": True, "HAS_G": True, "BLOCK": 4096}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if signature[p] in ("i32",) or "*" in
             signature[p]}
    src = ASTSource(fn=kernel, signature=signature, constexprs={p: constants[p] for p in params if p.isupper()},
                    attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
    assert re.search(r"ld\.global[^\n]*\.v4", ptx), "no 128-bit global loads"
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
    if not ptxas.exists():
        return
    ptx_file = Path(tempfile.mkdtemp()) / "kernel.ptx"
    ptx_file.write_text(ptx)
    report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx_file), "-o", os.devnull], capture_output=True,
                            text=True).stderr
    assert re.search(r"\b0 bytes spill stores", report), report


@pytest.fixture(scope="module")
def compiled() -> dict[str, tuple[float, float]]:
    """The same checks with the kernels compiled for CUDA (this process must not have ``TRITON_INTERPRET`` set)."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: the kernels would not be compiled")
    pytest.importorskip("triton")
    return _run_checks("cuda")


@pytest.mark.parametrize("name", CHECKS)
def test_triton_kernel_matches_reference_cuda(compiled, name):
    err, tol = compiled[name]
    assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g}"


if __name__ == "__main__":
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: skip
        print(exc)
        sys.exit(_SKIP)
    print(json.dumps(_run_checks()))
