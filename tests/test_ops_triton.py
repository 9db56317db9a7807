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
import json
import os
import subprocess
import sys

import pytest
import torch

_SKIP = 3  # exit code of the subprocess when triton cannot be imported
_KINDS_BETA = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)]
CHECKS = (
    [f"stats-{kind}" for kind, _ in _KINDS_BETA]
    + ["jsd-terms"]
    + [f"grad-{kind}-{dtype}" for kind, _ in _KINDS_BETA for dtype in ("float32", "bfloat16")]
    + [f"op-{kind}-{part}" for kind, _ in _KINDS_BETA for part in ("value", "grad")]
)


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
