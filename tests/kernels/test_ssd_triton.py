"""SSD's Triton backend against the float64 sequential reference, both designs (kernels/ssd/triton.py,
the default, and kernels/ssd/triton_fused.py, chosen by SSM_SUITE_SSD_TRITON=fused): forward and
backward (every input's gradient, initial and final states), packed sequences, odd lengths and L=1,
several dtypes, the one-token step, determinism, the custom ops' registrations, and the clear errors;
the fused design at its real tiling (N=128, P=64, 64-token chunks) under the interpreter's bounds
checker (tests/kernels/triton_bounds.py, itself tested here), with uninitialized memory poisoned.

The kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set before the kernels are
defined; kernels.ssd imports them lazily), at small shapes: chunk_size 16, a few heads.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from kernels.dispatch import forced_backend  # noqa: E402

# The bounds checker beside this file (pytest imports tests with --import-mode=importlib: no sys.path entry).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_bounds import OutOfBounds, bounds_checked, poisoned_empty  # noqa: E402
from kernels.ssd import ssd, ssd_step  # noqa: E402
from kernels.ssd.reference import ssd_reference, ssd_step_reference  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
# float32 inputs: exact float32 in the interpreter, tf32 matrix products on the GPU.
F32_TOL = 1e-5 if DEVICE == "cpu" else 5e-3
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def _load(name: str):
    """A kernels module, or a clean skip where it cannot be imported (Triton present but unusable).
    A kernel that imports but fails to run is a failure of the tests that call it, never a skip."""
    try:
        return __import__(f"kernels.ssd.{name}", fromlist=["_"])
    except ImportError as err:
        pytest.skip(f"triton kernels cannot load: {err!r}")


@pytest.fixture(params=["first", "fused"])
def sst(request, monkeypatch):
    """Each design of the scan in turn, selected the way users select it (SSM_SUITE_SSD_TRITON)."""
    monkeypatch.setenv("SSM_SUITE_SSD_TRITON", request.param)
    return _load("triton" if request.param == "first" else "triton_fused")


@pytest.fixture
def step_module():
    return _load("triton")


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setenv("SSM_SUITE_SSD_TRITON", "fused")
    return _load("triton_fused")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(batch=2, L=37, H=4, P=8, G=2, N=16, dtype=torch.float32, D_per_dim=False, states=None,
                z=True, D=True, dt_bias=True, initial_state=True):
    """Random inputs (raw dt around the softplus knee, A in a Mamba-2-like range), requiring grads."""
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    inputs = dict(
        x=randn(batch, L, H, P), dt=randn(batch, L, H),
        A=-(torch.rand(H, dtype=torch.float64) * 3 + 0.2).to(dtype).to(DEVICE),
        B=randn(batch, L, G, N), C=randn(batch, L, G, N),
        D=(randn(H, P) if D_per_dim else randn(H)) if D else None,
        z=randn(batch, L, H, P) if z else None,
        dt_bias=randn(H, scale=0.5) if dt_bias else None,
        initial_state=randn(batch if states is None else states, H, P, N).float() if initial_state else None,
    )
    for value in inputs.values():
        if value is not None:
            value.requires_grad_(True)
    return inputs


def call(fn, inputs, chunk_size=16, **kwargs):
    kwargs = {"dt_softplus": True, "return_final_state": True, **kwargs}
    i = inputs
    return fn(i["x"], i["dt"], i["A"], i["B"], i["C"], chunk_size, D=i["D"], z=i["z"], dt_bias=i["dt_bias"],
              initial_state=i["initial_state"], **kwargs)


def compare(inputs, fwd_tol, bwd_tol, chunk_size=16, **kwargs):
    """Run the Triton backend and the float64 reference; check y, the final state and every gradient."""
    with forced_backend("triton", "ssd"):
        y, final = call(ssd, inputs, chunk_size, **kwargs)
    ref_in = {k: None if v is None else v.detach().double().requires_grad_(True) for k, v in inputs.items()}
    y_ref, final_ref = call(ssd_reference, ref_in, chunk_size, **kwargs)
    assert y.dtype == inputs["x"].dtype and final.dtype == torch.float32
    assert rel(y, y_ref) < fwd_tol and rel(final, final_ref) < fwd_tol, (rel(y, y_ref), rel(final, final_ref))
    gy, gf = torch.randn_like(y_ref), torch.randn_like(final_ref)
    names = [k for k in NAMES if inputs[k] is not None]
    grads = torch.autograd.grad((y * gy.to(y.dtype)).sum() + (final * gf.float()).sum(),
                                [inputs[k] for k in names])
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (final_ref * gf).sum(), [ref_in[k] for k in names])
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert g.dtype == inputs[name].dtype and g.shape == inputs[name].shape, name
        assert torch.isfinite(g).all() and rel(g, g_ref) < bwd_tol, (name, rel(g, g_ref))


@pytest.mark.parametrize("G, D_per_dim, L", [(2, False, 37), (1, True, 48), (4, False, 5)])
def test_matches_reference_float32(sst, G, D_per_dim, L):
    compare(make_inputs(L=L, G=G, D_per_dim=D_per_dim), F32_TOL, F32_TOL)


def test_length_one_and_no_options(sst):
    # No softplus: a negative raw dt clamps to 0 (and that position's dt gradient is zeroed).
    inputs = make_inputs(L=1, z=False, D=False, dt_bias=False, initial_state=False)
    compare(inputs, F32_TOL, F32_TOL, dt_softplus=False)
    compare(make_inputs(L=19, G=1, z=False), F32_TOL, F32_TOL, dt_softplus=False, dt_limit=(0.05, 1.5))


def test_chunk_size_does_not_change_the_result(sst):
    inputs = make_inputs(L=40)
    with forced_backend("triton", "ssd"):
        y16, f16 = call(ssd, inputs, 16)
        y256, f256 = call(ssd, inputs, 256)  # runs as 64-token chunks (MAX_CHUNK)
    assert rel(y256, y16) < F32_TOL and rel(f256, f16) < F32_TOL


@pytest.mark.parametrize("with_state", [True, False])
def test_varlen_matches_reference(sst, with_state):
    # Sequences of 5, 0 (empty), 21 and 1 tokens packed in one row: the state restarts at each.
    cu = torch.tensor([0, 5, 5, 26, 27], device=DEVICE)
    inputs = make_inputs(batch=1, L=27, states=4, initial_state=with_state)
    compare(inputs, F32_TOL, F32_TOL, cu_seqlens=cu)


def test_small_blocks_split_every_sum(fused, monkeypatch):
    # Blocks smaller than P and N: several programs share each state walk (their parts of the decay's
    # gradient summed), each chunk's backward runs in blocks of P (partial ddt and dA summed), dB/dC over
    # blocks of N with the heads split (partials summed); P and N not powers of two (masked edges).
    for name, value in dict(PASS_BLOCK_P=16, PASS_BLOCK_N=16, DX_BLOCK_P=16, DBC_BLOCK_N=16).items():
        monkeypatch.setattr(fused, name, value)
    inputs = make_inputs(batch=2, L=45, H=4, P=40, G=1, N=24)
    compare(inputs, F32_TOL, F32_TOL)
    assert fused._head_splits(4, 1) == 4 and fused._head_splits(6, 1) == 2 and fused._head_splits(4, 10**6) == 1


def test_unknown_design_is_an_error(monkeypatch):
    monkeypatch.setenv("SSM_SUITE_SSD_TRITON", "fast")
    inputs = {k: None if v is None else v.detach() for k, v in make_inputs(L=4).items()}
    with forced_backend("triton", "ssd"), pytest.raises(ValueError, match="SSM_SUITE_SSD_TRITON"):
        call(ssd, inputs)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_half_precision(sst, dtype, tol):
    compare(make_inputs(L=33, dtype=dtype), tol, tol)


def test_float64_runs_the_exact_path(sst):
    inputs = make_inputs(L=9, dtype=torch.float64)
    with forced_backend("triton", "ssd"):
        y, final = call(ssd, inputs)
    y_ref, final_ref = call(ssd_reference, inputs)
    assert y.dtype == torch.float64 and rel(y, y_ref) < 1e-12 and rel(final, final_ref) < 1e-12


def test_backward_is_deterministic(sst):
    inputs = make_inputs(L=35)
    grads = []
    for _ in range(2):
        with forced_backend("triton", "ssd"):
            y, final = call(ssd, inputs)
        grads.append(torch.autograd.grad(y.float().square().sum() + final.sum(),
                                         [inputs[k] for k in NAMES]))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype, D_per_dim", [(torch.float32, False), (torch.bfloat16, True)])
def test_step_matches_reference(step_module, dtype, D_per_dim):
    batch, H, P, G, N = 3, 4, 8, 2, 16
    x = torch.randn(batch, H, P).to(dtype)
    dt, B, C = torch.randn(batch, H).to(dtype), torch.randn(batch, G, N).to(dtype), torch.randn(batch, G, N).to(dtype)
    A = -torch.rand(H) * 3 - 0.2
    D = torch.randn(H, P) if D_per_dim else torch.randn(H)
    z, dt_bias = torch.randn(batch, H, P).to(dtype), torch.randn(H) * 0.5
    state = torch.randn(batch, H, P, N)
    state_ref = state.double()
    args = [t.to(DEVICE) for t in (x, dt, A, B, C, D, z, dt_bias)]
    state = state.to(DEVICE)
    with forced_backend("triton", "ssd_step"):
        y = ssd_step(state, *args, dt_softplus=True, dt_limit=(0.0, 2.0))
    y_ref = ssd_step_reference(state_ref, *[t.cpu().double() for t in args], dt_softplus=True, dt_limit=(0.0, 2.0))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and rel(y, y_ref) < tol and rel(state, state_ref) < 1e-5


def test_step_equals_last_token_of_scan(sst):
    inputs = make_inputs(batch=2, L=6)
    with forced_backend("triton", "ssd"):
        y, final = call(ssd, {k: None if v is None else v.detach() for k, v in inputs.items()})
    i = {k: None if v is None else v.detach() for k, v in inputs.items()}
    with forced_backend("triton", "ssd"):
        _, state = ssd(i["x"][:, :-1], i["dt"][:, :-1], i["A"], i["B"][:, :-1], i["C"][:, :-1], 16, D=i["D"],
                       z=i["z"][:, :-1], dt_bias=i["dt_bias"], dt_softplus=True, initial_state=i["initial_state"],
                       return_final_state=True)
    with forced_backend("triton", "ssd_step"):
        y_step = ssd_step(state, i["x"][:, -1], i["dt"][:, -1], i["A"], i["B"][:, -1], i["C"][:, -1], D=i["D"],
                          z=i["z"][:, -1], dt_bias=i["dt_bias"], dt_softplus=True)
    assert rel(y_step, y[:, -1]) < F32_TOL and rel(state, final) < F32_TOL


def test_custom_ops_pass_opcheck(sst):
    inputs = make_inputs(batch=1, L=5, H=2, P=4, G=1, N=8)
    i = {k: None if v is None else v.detach() for k, v in inputs.items()}
    from kernels.ssd.triton import _layout  # both designs lay packed sequences out alike

    meta, _, _ = _layout(5, 16, 1, None, i["x"].device)
    args = (i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], i["z"], i["dt_bias"], i["initial_state"], meta,
            16, 1, True, 0.0, math.inf)
    ops = torch.ops.ssm_suite
    scan_op = ops.ssd_fused_fwd if sst.__name__.endswith("fused") else ops.ssd_scan_fwd
    torch.library.opcheck(scan_op.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    state = torch.randn(1, 2, 4, 8, device=DEVICE)
    step_args = (state, i["x"][:, 0].contiguous(), i["dt"][:, 0].contiguous(), i["A"], i["B"][:, 0].contiguous(),
                 i["C"][:, 0].contiguous(), i["D"], i["z"][:, 0].contiguous(), i["dt_bias"], True, 0.0, math.inf)
    torch.library.opcheck(torch.ops.ssm_suite.ssd_step.default, step_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_grid_limit_is_a_clear_error(fused):
    # More rows x heads than a grid dimension holds: an error naming the limit and the fix.
    x = torch.randn(1, 2, 65536, 1, device=DEVICE)
    with forced_backend("triton", "ssd"), pytest.raises(ValueError, match="65535"):
        ssd(x, torch.randn(1, 2, 65536, device=DEVICE), -torch.ones(65536, device=DEVICE),
            torch.randn(1, 2, 1, 8, device=DEVICE), torch.randn(1, 2, 1, 8, device=DEVICE), 16)


def test_clear_errors(sst):
    x = torch.randn(1, 4, 2, 200, device=DEVICE)
    with forced_backend("triton", "ssd"), pytest.raises(ValueError, match="headdim"):
        ssd(x, torch.randn(1, 4, 2, device=DEVICE), -torch.ones(2, device=DEVICE),
            torch.randn(1, 4, 1, 8, device=DEVICE), torch.randn(1, 4, 1, 8, device=DEVICE), 16)
    with forced_backend("triton", "ssd"), pytest.raises(ValueError, match="state size"):
        ssd(x[..., :8], torch.randn(1, 4, 2, device=DEVICE), -torch.ones(2, device=DEVICE),
            torch.randn(1, 4, 1, 300, device=DEVICE), torch.randn(1, 4, 1, 300, device=DEVICE), 16)


# ----------------------------------------------------------------------------------------------------
# Memory safety: the bounds checker, and the fused design under it


@triton.jit
def _copy_kernel(src, dst, n, READ_EXTRA: tl.constexpr, BLOCK: tl.constexpr):
    """dst[:n] = src[:n]; READ_EXTRA reads that many elements past n (masked off in the store)."""
    i = tl.arange(0, BLOCK)
    v = tl.load(src + i, mask=i < n + READ_EXTRA, other=0.0)
    tl.store(dst + i, v, mask=i < n)


@pytest.mark.skipif(DEVICE != "cpu", reason="the bounds checker wraps Triton's CPU interpreter")
def test_bounds_checker_catches_one_element_past_the_end():
    src, dst = torch.arange(10.0), torch.zeros(10)
    with bounds_checked() as checker:
        _copy_kernel[(1,)](src, dst, 10, READ_EXTRA=0, BLOCK=16)  # 16 lanes, 6 masked off: in bounds
    assert torch.equal(dst, src) and checker.launches == ["_copy_kernel"] and checker.accesses == 2
    with bounds_checked(), pytest.raises(OutOfBounds, match=r"_copy_kernel: load of 1 element.*'src' \[10\] "
                                                            r"float32.*0 bytes past its end"):
        _copy_kernel[(1,)](src, dst, 10, READ_EXTRA=1, BLOCK=16)
    # A store past the end of a view, into the rest of its buffer: caught against the view's extent,
    # allowed against the whole storage.
    buffer = torch.zeros(32)
    with bounds_checked(), pytest.raises(OutOfBounds, match=r"store of 1 element.*'dst' \[10\]"):
        _copy_kernel[(1,)](torch.arange(16.0), buffer[:10], 11, READ_EXTRA=0, BLOCK=16)
    with bounds_checked(views=False):
        _copy_kernel[(1,)](torch.arange(16.0), buffer[:10], 11, READ_EXTRA=0, BLOCK=16)
    assert buffer[10] == 10.0
    # Outside the block, nothing is checked (and the interpreter is restored).
    _copy_kernel[(1,)](src, dst, 10, READ_EXTRA=1, BLOCK=16)


def test_poisoned_empty_fills_uninitialized_memory():
    originals = (torch.empty, torch.empty_like, torch.Tensor.new_empty)
    with poisoned_empty():
        a, b, c = torch.empty(3), torch.empty_like(torch.zeros(2, dtype=torch.bfloat16)), torch.zeros(2).new_empty(4)
        i = torch.empty(2, dtype=torch.int32)
    assert a.isnan().all() and b.isnan().all() and c.isnan().all() and (i == 2**30 - 1).all()
    assert (torch.empty, torch.empty_like, torch.Tensor.new_empty) == originals  # restored


@pytest.mark.skipif(DEVICE != "cpu", reason="the bounds checker wraps Triton's CPU interpreter")
@pytest.mark.parametrize("case", ["layer", "varlen_states", "limits"])
def test_fused_stays_in_bounds(fused, monkeypatch, case):
    # The GPU's first fused run (layer call, z: (8, 2048, 24, 64, 1, 128) bf16, no initial state) died of
    # an illegal memory access. Here, at the same tiling (N=128, P=64, 64-token chunks, the heads of a
    # group split in two for dB/dC as there), every address each kernel forms is checked against the
    # tensors of its launch, and uninitialized buffers are NaN, so a read of memory nobody wrote shows.
    if case == "layer":  # odd length: a partial last chunk
        monkeypatch.setattr(fused, "DBC_TARGET_PROGRAMS", 12)  # 3 chunks x 2 blocks of N: 2 splits
        assert fused._head_splits(4, 6) == 2
        inputs = make_inputs(batch=1, L=150, H=4, P=64, G=1, N=128, dtype=torch.bfloat16, initial_state=False)
        kwargs = {}
    elif case == "varlen_states":  # packed sequences, an empty one, initial states, two groups
        inputs = make_inputs(batch=1, L=27, H=4, P=16, G=2, N=16, dtype=torch.float16, states=4)
        kwargs = {"cu_seqlens": torch.tensor([0, 5, 5, 26, 27])}
    else:  # the limit sizes P=128, N=256, D per dim
        inputs = make_inputs(batch=1, L=70, H=2, P=128, G=2, N=256, D_per_dim=True)
        kwargs = {}
    tol = 2e-2 if inputs["x"].dtype == torch.bfloat16 else 5e-3 if inputs["x"].dtype == torch.float16 else F32_TOL
    with bounds_checked() as checker, poisoned_empty():
        compare(inputs, tol, tol, chunk_size=256, **kwargs)  # runs as 64-token chunks
    assert checker.launches == ["_chunk_cb", "_fwd_state", "_fwd_out", "_bwd_state", "_bwd_dx", "_bwd_dbc"]


def test_step_takes_row_strided_views_without_copies(step_module):
    """x, dt, B, C, z as views into one [B, total] buffer (as in_proj's split output): the same result,
    bit for bit, as contiguous copies; a tensor whose rows are not dense (here transposed) is copied."""
    from kernels.ssd import triton as ssd_triton

    batch, H, P, G, N = 3, 4, 8, 2, 16
    buf = torch.randn(batch, 2 * H * P + 2 * G * N + H + 5).to(DEVICE)  # 5 columns of padding per row
    x = buf[:, : H * P].view(batch, H, P)
    z = buf[:, H * P: 2 * H * P].view(batch, H, P)
    B = buf[:, 2 * H * P: 2 * H * P + G * N].view(batch, G, N)
    C = buf[:, 2 * H * P + G * N: 2 * H * P + 2 * G * N].view(batch, G, N)
    dt = buf[:, 2 * H * P + 2 * G * N: 2 * H * P + 2 * G * N + H]
    assert not x.is_contiguous() and ssd_triton._dense_rows(x) and ssd_triton._dense_rows(dt)
    assert not ssd_triton._dense_rows(torch.randn(batch, P, H).transpose(1, 2))
    A, D, dt_bias = -torch.rand(H).to(DEVICE) - 0.2, torch.randn(H).to(DEVICE), torch.randn(H).to(DEVICE) * 0.5
    state = torch.randn(batch, H, P, N).to(DEVICE)
    outs = []
    for views in (True, False):
        s = state.clone()
        args = (x, dt, A, B, C) if views else tuple(t.contiguous() for t in (x, dt, A, B, C))
        with forced_backend("triton", "ssd_step"):
            y = ssd_step(s, *args, D=D, z=z if views else z.contiguous(), dt_bias=dt_bias, dt_softplus=True)
        outs.append((y, s))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert outs[0][0].is_contiguous()
    y_ref = ssd_step_reference(state.double().cpu(), *[t.cpu().double() for t in (x, dt, A, B, C, D, z, dt_bias)],
                               dt_softplus=True)
    assert rel(outs[0][0], y_ref) < 1e-5
