"""Triton (gated) RMSNorm with fused residual add against the reference, on CPU through
TRITON_INTERPRET=1 at small shapes: plain / gated both ways / groups, the residual stream (its dtype,
the first-block form without a residual), forward and every gradient, dtypes, odd sizes, determinism,
torch.library checks and input errors."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels.dispatch import forced_backend  # noqa: E402
from kernels.norm import rms_norm  # noqa: E402

try:
    from kernels.norm import triton as norm_triton  # noqa: E402
except ImportError as error:  # pragma: no cover - triton present but unusable here (a broken kernel module fails)
    pytest.skip(f"triton kernels cannot load: {error}", allow_module_level=True)

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(shape, dtype, gate, residual_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = rnd(*shape).to(dtype).to(DEVICE)
    weight = (1 + 0.3 * rnd(shape[-1])).to(dtype).to(DEVICE)
    z = rnd(*shape).to(dtype).to(DEVICE) if gate else None
    residual = rnd(*shape).to(residual_dtype).to(DEVICE) if residual_dtype is not None else None
    return x, weight, z, residual


def run_both(x, weight, z, residual, group_size=None, norm_before_gate=False, residual_out_dtype=None):
    """Outputs and gradients of the triton op and of the float64 reference."""
    prenorm = residual is not None or residual_out_dtype is not None
    gen = torch.Generator().manual_seed(1)
    grads_out, results = None, []
    for backend in ("triton", "reference"):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, z, residual)]
        if backend == "reference":
            leaves = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
        kwargs = {}
        if prenorm:
            kwargs = {"residual": leaves[3],
                      "residual_out_dtype": torch.float64 if backend == "reference" else residual_out_dtype}
        with forced_backend(backend, "rms_norm"):
            outs = rms_norm(leaves[0], leaves[1], 1e-5, leaves[2], group_size, norm_before_gate, **kwargs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if grads_out is None:
            grads_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
        present = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(outs, present, [g.to(o) for g, o in zip(grads_out, outs)])
        results.append((outs, grads))
    return results


@pytest.mark.parametrize("gate", [None, "before_norm", "after_norm"])
@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("residual", [False, True])
def test_matches_reference_float64(gate, group_size, residual):
    x, weight, z, res = make((3, 5, 12), torch.float64, gate is not None, torch.float64 if residual else None)
    (ours, g_ours), (ref, g_ref) = run_both(x, weight, z, res, group_size, gate == "after_norm")
    assert len(ours) == (2 if residual else 1)
    for a, b in list(zip(ours, ref)) + list(zip(g_ours, g_ref)):
        assert rel(a, b) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_residual_stream_in_fp32(dtype):
    # The pre-norm block: low-precision x, fp32 residual stream, odd row count and feature size.
    x, weight, z, res = make((7, 40), dtype, True, residual_dtype=torch.float32)
    (ours, g_ours), (ref, g_ref) = run_both(x, weight, z, res, 8, False, residual_out_dtype=torch.float32)
    assert ours[0].dtype == dtype and ours[1].dtype == torch.float32
    assert g_ours[0].dtype == dtype and g_ours[3].dtype == torch.float32
    for a, b in list(zip(ours, ref)) + list(zip(g_ours, g_ref)):
        assert rel(a, b) < TOL[dtype]


def test_first_block_residual_out_without_residual():
    x, weight, _, _ = make((5, 24), torch.bfloat16, False)
    (ours, g_ours), (ref, g_ref) = run_both(x, weight, None, None, residual_out_dtype=torch.float32)
    assert ours[1].dtype == torch.float32 and torch.equal(ours[1], x.float())
    for a, b in list(zip(ours, ref)) + list(zip(g_ours, g_ref)):
        assert rel(a, b) < TOL[torch.bfloat16]


def test_residual_default_dtype_and_plain_call_unchanged():
    x, weight, _, res = make((4, 16), torch.float32, False, residual_dtype=torch.float16)
    with forced_backend("triton", "rms_norm"):
        out, res_out = rms_norm(x, weight, 1e-5, residual=res)
        plain = rms_norm(x, weight, 1e-5)
    assert res_out.dtype == torch.float16 and out.dtype == torch.float32
    assert isinstance(plain, torch.Tensor)


@pytest.mark.parametrize("sms", [1, 64])
def test_backward_partial_sums_deterministic(monkeypatch, sms):
    # Several rows per program (sms=1) or one (64): dweight from the partial rows, bit-identical re-runs.
    monkeypatch.setattr(norm_triton, "_num_sms", lambda device: sms)
    x, weight, z, _ = make((37, 20), torch.float32, True)
    (_, g1), (_, g_ref) = run_both(x, weight, z, None, 10, True)
    (_, g2), _ = run_both(x, weight, z, None, 10, True)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    for a, b in zip(g1, g_ref):
        assert rel(a, b) < 1e-5


def test_single_row_and_one_feature_groups():
    x, weight, z, _ = make((1, 6), torch.float64, True)
    (ours, g_ours), (ref, g_ref) = run_both(x, weight, z, None, 1, False)
    for a, b in list(zip(ours, ref)) + list(zip(g_ours, g_ref)):
        assert rel(a, b) < 1e-12


def test_errors():
    x, weight, z, _ = make((2, 12), torch.float32, True)
    with forced_backend("triton", "rms_norm"):
        with pytest.raises(ValueError, match="group_size 5"):
            rms_norm(x, weight, 1e-5, z, group_size=5)
        with pytest.raises(ValueError, match="z must have"):
            rms_norm(x, weight, 1e-5, z[:, :6])
        with pytest.raises(ValueError, match="residual must have"):
            rms_norm(x, weight, 1e-5, residual=x[:1])


def test_library_opcheck():
    x, weight, z, res = make((3, 8), torch.float32, True, residual_dtype=torch.float32)
    torch.library.opcheck(torch.ops.ssm_suite.rms_norm_fwd.default,
                          (x, weight, 1e-5, z, 4, False, res, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))
