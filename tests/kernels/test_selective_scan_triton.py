"""Triton selective scan (forward, backward, step) against the reference, on CPU through
TRITON_INTERPRET=1 at small shapes: every optional input (D, z, delta_bias, softplus, initial state),
shared / grouped / mixed B and C, packed sequences with empty and one-token ones, odd lengths and L=1,
several tiles and channel blocks per program (carries, partial-row reductions), dtypes, bit-identical
gradients on re-run, the in-place step, torch.library checks and the errors for what the kernels cannot
take.

The interpreter runs ``tl.associative_scan`` one element at a time in Python; the fixture below swaps in
an equivalent that combines whole slices along the scan axis (same order of combines, same results),
which keeps the file well under a minute.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from kernels.dispatch import forced_backend  # noqa: E402
from kernels.selective_scan import selective_scan, selective_scan_step  # noqa: E402
from kernels.selective_scan.reference import selective_scan_reference, selective_scan_step_reference  # noqa: E402

try:
    from kernels.selective_scan import triton as ss_triton  # noqa: E402
except ImportError as error:  # pragma: no cover - triton present but unusable here (a broken kernel module fails)
    pytest.skip(f"triton kernels cannot load: {error}", allow_module_level=True)

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _sliced_scan(self, inputs):
    """ScanOps.generic_scan, one combine per position of the scan axis instead of per element."""
    axis = self.axis
    datas = [np.moveaxis(arg.handle.data, axis, 0) for arg in inputs]
    outs = [np.empty_like(d) for d in datas]
    acc = None
    for k in range(datas[0].shape[0]):
        cur = tuple(self.to_tensor(np.ascontiguousarray(d[k]), arg.dtype) for d, arg in zip(datas, inputs))
        if acc is None:
            acc = cur
        else:
            ret = self.combine_fn.fn(*acc, *cur)
            acc = ret if isinstance(ret, tuple) else (ret,)
        for out, value in zip(outs, acc):
            out[k] = value.handle.data
    return [self.to_tensor(np.moveaxis(out, 0, axis), arg.dtype) for out, arg in zip(outs, inputs)]


@pytest.fixture(autouse=True)
def fast_interpreter_scan(monkeypatch):
    if INTERPRET:
        from triton.runtime import interpreter

        monkeypatch.setattr(interpreter.ScanOps, "generic_scan", _sliced_scan)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 channels x 8 positions (4 in the forward) and checkpoints every 16 positions: several
    tiles per checkpoint chunk, several chunks and channel blocks per case."""
    monkeypatch.setitem(ss_triton.TILES, "fwd", (4, 4, 1))
    monkeypatch.setitem(ss_triton.TILES, "bwd", (4, 8, 1))
    monkeypatch.setitem(ss_triton.TILES, "chunk", 16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(batch, dim, L, dstate, dtype, *, groups_b=None, groups_c=None, D=True, z=True, bias=True,
         states=None, seed=0):
    """Inputs in the order (u, delta, A, B, C, D, z, delta_bias, initial_state); None for absent ones."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE)

    def bc(groups):
        return r(batch, dstate, L) if groups is None else r(batch, groups, dstate, L)

    return [r(batch, dim, L).to(dtype), r(batch, dim, L, scale=0.5).to(dtype),
            -torch.rand(dim, dstate, generator=gen, dtype=torch.float64).to(DEVICE) * 2 - 0.1,
            bc(groups_b).to(dtype), bc(groups_c).to(dtype),
            r(dim) if D else None, r(batch, dim, L).to(dtype) if z else None,
            r(dim, scale=0.3) if bias else None, r(states, dim, dstate) if states else None]


def run_both(inputs, softplus=True, cu_seqlens=None, backends=("triton", "reference")):
    """Outputs (y, final state) and the gradients of every present input, for the triton op and for
    the float64 reference, under the same random output gradients."""
    gen = torch.Generator().manual_seed(1)
    results, grads_out = [], None
    for backend in backends:
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
        if backend == "reference":
            leaves = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
        u, delta, A, B, C, D, z, bias, init = leaves
        with forced_backend(backend, "selective_scan"):
            y, final = selective_scan(u, delta, A, B, C, D, z, bias, softplus, init, True, cu_seqlens)
        if grads_out is None:
            grads_out = (torch.randn(y.shape, generator=gen, dtype=torch.float64).to(DEVICE),
                         torch.randn(final.shape, generator=gen, dtype=torch.float64).to(DEVICE))
        present = [t for t in leaves if t is not None]
        grads = torch.autograd.grad([y, final], present, [grads_out[0].to(y.dtype), grads_out[1].to(final.dtype)])
        results.append(((y, final), grads))
    return results


def assert_close(results, tol):
    (ours, g_ours), (ref, g_ref) = results
    for a, b in zip(ours, ref):
        assert rel(a, b) < tol
    assert len(g_ours) == len(g_ref)
    for a, b in zip(g_ours, g_ref):
        assert a.shape == b.shape
        assert rel(a, b) < tol, [f"{rel(x, y):.1e}" for x, y in zip(g_ours, g_ref)]


@pytest.mark.parametrize("options", [
    dict(),                                                     # D, z, delta_bias, softplus, states
    dict(D=False, z=False, bias=False, softplus=False, states=False),
])
def test_matches_reference_forward_backward(options):
    options = dict(options)
    softplus = options.pop("softplus", True)
    states = 2 if options.pop("states", True) else None
    inputs = make(2, 5, 37, 3, torch.float64, states=states, **options)
    results = run_both(inputs, softplus)
    assert_close(results, TOL[torch.float64])
    (y, final), grads = results[0]
    assert y.dtype == torch.float64 and final.shape == (2, 5, 3)
    assert len(grads) == sum(t is not None for t in inputs)


@pytest.mark.parametrize("groups", [(3, 3), (None, 3), (3, None)])
def test_grouped_and_mixed_bc(groups):
    inputs = make(1, 6, 19, 4, torch.float64, groups_b=groups[0], groups_c=groups[1], states=1)
    results = run_both(inputs)
    assert_close(results, TOL[torch.float64])
    # B's gradient keeps B's layout (shared [B, N, L] or grouped [B, G, N, L])
    assert results[0][1][3].shape == inputs[3].shape and results[0][1][4].shape == inputs[4].shape


def test_several_tiles_and_blocks_deterministic(small_tiles):
    # N=16 (a full Mamba state), 2 channel blocks in each of 2 groups, 7 forward / 4 backward tiles in 2
    # checkpoint chunks, the last tile ragged
    inputs = make(2, 10, 27, 16, torch.float32, groups_b=2, groups_c=2, states=2)
    first = run_both(inputs)
    assert_close(first, TOL[torch.float32])
    again = run_both(inputs, backends=("triton",))
    assert all(torch.equal(a, b) for a, b in zip(first[0][1], again[0][1]))
    assert all(torch.equal(a, b) for a, b in zip(first[0][0], again[0][0]))


def test_varlen_with_empty_and_one_token_sequences(small_tiles):
    lengths = [5, 0, 1, 12, 3]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(DEVICE)
    inputs = make(1, 5, sum(lengths), 3, torch.float64, states=len(lengths))
    results = run_both(inputs, cu_seqlens=cu)
    assert_close(results, TOL[torch.float64])
    # the empty sequence: its final state is its initial state (its gradient passing straight through
    # is part of the comparison above)
    (_, final), _ = results[0]
    assert rel(final[1], inputs[8][1]) < 1e-12


def test_varlen_equals_separate_runs():
    cu = torch.tensor([0, 6, 13], dtype=torch.int64, device=DEVICE)
    u, delta, A, B, C, D, z, bias, _ = make(1, 4, 13, 2, torch.float32)
    packed = ss_triton.selective_scan_triton(u, delta, A, B, C, D, z, bias, True, cu_seqlens=cu)
    parts = [ss_triton.selective_scan_triton(u[..., s:e], delta[..., s:e], A, B[..., s:e], C[..., s:e], D,
                                             z[..., s:e], bias, True) for s, e in ((0, 6), (6, 13))]
    assert rel(packed, torch.cat(parts, -1)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    inputs = make(2, 4, 21, 4, dtype, states=2)
    results = run_both(inputs)
    (y, final), grads = results[0]
    assert y.dtype == dtype and final.dtype == torch.float32
    assert grads[0].dtype == dtype and grads[2].dtype == torch.float64  # du in u's dtype, dA in A's
    assert_close(results, TOL[dtype])


def test_adversarial_decays_stay_finite_and_exact(small_tiles):
    # dt = softplus(delta + bias) from ~1e-4 up to ~40 and |A| up to 30: exp(dt A) spans 1 down to an
    # exact 0 (underflow), within a tile and across tile / chunk boundaries; nothing may overflow.
    gen = torch.Generator().manual_seed(7)
    inputs = make(2, 5, 41, 6, torch.float32, states=2, seed=7)
    inputs[1] = (torch.randn(2, 5, 41, generator=gen, dtype=torch.float64) * 12.0).float().to(DEVICE)
    inputs[2] = -(torch.rand(5, 6, generator=gen, dtype=torch.float64) * 30.0 + 1e-3).to(DEVICE)
    results = run_both(inputs)
    (y, final), grads = results[0]
    assert all(bool(torch.isfinite(t).all()) for t in (y, final, *grads))
    assert_close(results, TOL[torch.float32])


def test_channel_last_views_keep_their_layout(small_tiles):
    # A Mamba layer passes [B, L, D] tensors seen as [B, D, L] and B, C as slices of one projection:
    # y and du / ddelta / dz come back channel-last, so the layer's transposes cost nothing.
    batch, dim, L, dstate = 2, 6, 23, 3
    gen = torch.Generator().manual_seed(5)

    def bld(scale=1.0):
        return (torch.randn(batch, L, dim, generator=gen, dtype=torch.float64) * scale).to(DEVICE).transpose(1, 2)

    proj = torch.randn(batch, L, 4 + 2 * dstate, generator=gen, dtype=torch.float64).to(DEVICE)
    inputs = [bld(), bld(0.5), -torch.rand(dim, dstate, generator=gen, dtype=torch.float64).to(DEVICE) - 0.1,
              proj[..., 4:4 + dstate].transpose(1, 2), proj[..., 4 + dstate:].transpose(1, 2),
              torch.randn(dim, generator=gen, dtype=torch.float64).to(DEVICE), bld(),
              torch.randn(dim, generator=gen, dtype=torch.float64).to(DEVICE), None]
    results = run_both(inputs)
    assert_close(results, TOL[torch.float64])
    (y, _), grads = results[0]
    assert y.stride(1) == 1 and grads[0].stride(1) == 1 and grads[1].stride(1) == 1 and grads[6].stride(1) == 1


def test_bf16_projection_slices_give_the_contiguous_result(small_tiles):
    # bf16 B, C as [B, N, L] views of one [B, L, J] projection are converted to float32 along N (rows
    # of the projection), not along L: the same values in another layout, so bit-identical results.
    batch, dim, L, dstate = 2, 6, 23, 3
    u, delta, A, _, _, D, z, bias, _ = make(batch, dim, L, dstate, torch.bfloat16)
    proj = torch.randn(batch, L, 4 + 2 * dstate, dtype=torch.float64).to(DEVICE, torch.bfloat16)
    dy = torch.randn(batch, dim, L, dtype=torch.float64).to(DEVICE, torch.bfloat16)
    outputs = []
    for dense in (False, True):
        leaf = proj.detach().clone().requires_grad_()
        B, C = leaf[..., 4:4 + dstate].transpose(1, 2), leaf[..., 4 + dstate:].transpose(1, 2)
        if dense:
            B, C = B.contiguous(), C.contiguous()
        else:
            assert B.stride(1) == 1 and B.stride(2) == 4 + 2 * dstate  # the layer's layout
        with forced_backend("triton", "selective_scan"):
            y = selective_scan(u, delta, A, B, C, D, z, bias, True)
        (grad,) = torch.autograd.grad(y, [leaf], dy)
        outputs.append((y, grad))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


@pytest.mark.parametrize("tiles", [
    {"fwd": (8, 8, 1), "bwd": (2, 4, 1), "chunk": 8},   # one tile per chunk in the forward's save pass
    {"fwd": (2, 16, 1), "bwd": (8, 2, 1), "chunk": 8},   # the forward's tile does not divide the chunk
    {"fwd": (4, 4, 2), "bwd": (4, 4, 2), "chunk": 4},   # several warps, one tile per chunk
])
def test_tile_settings_agree(monkeypatch, tiles):
    for key, value in tiles.items():
        monkeypatch.setitem(ss_triton.TILES, key, value)
    inputs = make(1, 9, 29, 5, torch.float64, groups_b=3, groups_c=3, states=1)
    assert_close(run_both(inputs), TOL[torch.float64])


def assert_same_results(first, second) -> None:
    """Two run_both results' triton outputs and gradients agree to float64 rounding (tile settings that
    only reorder additions)."""
    (outs_a, grads_a), (outs_b, grads_b) = first[0], second[0]
    for a, b in zip((*outs_a, *grads_a), (*outs_b, *grads_b)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_small_grid_narrows_the_forward_channel_block(monkeypatch):
    """Where the forward's grid would leave SMs idle (a prefill at batch 1) its channel block halves, down
    to TILES["fwd_min_block_d"]; the result does not change (forward and backward)."""
    assert ss_triton._narrow_for_small_grid(16, 1, 1536, 264) == 8  # mamba1-130m at batch 1, 132 SMs
    assert ss_triton._narrow_for_small_grid(16, 8, 1536, 264) == 16  # batch 8: 768 programs already
    assert ss_triton._narrow_for_small_grid(16, 1, 1536, 0) == 16  # CPU: no target
    monkeypatch.setitem(ss_triton.TILES, "fwd_min_block_d", 4)
    assert ss_triton._narrow_for_small_grid(16, 1, 1536, 528) == 4
    inputs = make(2, 24, 19, 4, torch.float64, states=2)
    wide = run_both(inputs)
    monkeypatch.setitem(ss_triton.TILES, "fwd_min_programs", 10**6)  # narrowest blocks at this size
    narrow = run_both(inputs)
    assert_close(narrow, TOL[torch.float64])
    assert_same_results(wide, narrow)


def test_large_grids_of_channel_last_inputs_take_the_wide_forward_tiles(monkeypatch):
    """TILES["fwd_wide"] for channel-last u (a Mamba layer's view) on grids of at least
    TILES["fwd_wide_min_programs"] programs (CUDA: 16 per SM; never on CPU); the result does not change."""
    u = torch.zeros(4, 64, 10).transpose(1, 2)  # [B, D, L] with unit channel stride
    assert not ss_triton._wide_forward(4, 64, 16, u)  # CPU without an explicit threshold
    monkeypatch.setitem(ss_triton.TILES, "fwd_wide_min_programs", 8)
    assert ss_triton._wide_forward(4, 64, 16, u)  # 4 rows x 2 blocks of 32 channels
    assert not ss_triton._wide_forward(3, 64, 16, u)
    assert not ss_triton._wide_forward(4, 64, 16, u.contiguous())  # length-contiguous: not measured wide
    assert not ss_triton._wide_forward(4, 64, 64, u)  # large states spread N over lanes instead
    gen = torch.Generator().manual_seed(5)
    batch, dim, length, dstate = 3, 40, 13, 4
    x = torch.randn(batch, length, dim, generator=gen, dtype=torch.float64)
    inputs = list(make(batch, dim, length, dstate, torch.float64, states=batch))
    inputs[0] = x.transpose(1, 2).to(DEVICE)  # channel-last u
    monkeypatch.setitem(ss_triton.TILES, "fwd_wide_min_programs", 10**6)
    narrow = run_both(inputs)
    monkeypatch.setitem(ss_triton.TILES, "fwd_wide_min_programs", 1)
    wide = run_both(inputs)
    assert_close(wide, TOL[torch.float64])
    assert_same_results(wide, narrow)


def test_chunk_must_hold_whole_backward_tiles(monkeypatch):
    monkeypatch.setitem(ss_triton.TILES, "bwd", (4, 8, 1))
    monkeypatch.setitem(ss_triton.TILES, "chunk", 12)
    u, delta, A, B, C, *_ = make(1, 2, 5, 2, torch.float32, D=False, z=False, bias=False)
    with forced_backend("triton", "selective_scan"), pytest.raises(ValueError, match="multiple"):
        selective_scan(u, delta, A, B, C)


def test_length_one():
    inputs = make(3, 4, 1, 3, torch.float64, states=3)
    assert_close(run_both(inputs), TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("groups", [None, 2])
def test_step_updates_state_in_place(dtype, groups):
    gen = torch.Generator().manual_seed(3)
    batch, dim, dstate = 3, 6, 5

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE)

    x, dt, z = r(batch, dim).to(dtype), r(batch, dim).to(dtype), r(batch, dim).to(dtype)
    A = -torch.rand(dim, dstate, generator=gen, dtype=torch.float64).to(DEVICE)
    bshape = (batch, dstate) if groups is None else (batch, groups, dstate)
    B, C = r(*bshape).to(dtype), r(*bshape).to(dtype)
    D, dt_bias = r(dim), r(dim)
    state = r(batch, dim, dstate).float() if dtype != torch.float64 else r(batch, dim, dstate)
    ours_state, ref_state = state.clone(), state.clone()
    with forced_backend("triton", "selective_scan_step"):
        y = selective_scan_step(ours_state, x, dt, A, B, C, D, z, dt_bias, True)
    y_ref = selective_scan_step_reference(ref_state, x, dt, A, B, C, D, z, dt_bias, True)
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    assert y.dtype == dtype and rel(y, y_ref) < tol
    assert rel(ours_state, ref_state) < (1e-12 if dtype == torch.float64 else 1e-6)
    # the step continues a scan: equal to the scan's last output from the same state
    y_full = selective_scan_reference(x[..., None].double(), dt[..., None].double(), A, B[..., None].double(),
                                      C[..., None].double(), D, z[..., None].double(), dt_bias, True, state)
    assert rel(y, y_full[..., -1]) < tol


def test_library_opcheck_and_fake():
    u, delta, A, B, C, D, z, bias, init = make(2, 3, 5, 2, torch.float32, states=2)
    for save in (False, True):
        torch.library.opcheck(torch.ops.ssm_suite.selective_scan_fwd.default,
                              (u, delta, A, B, C, D, z, bias, True, init, True, None, save),
                              test_utils=("test_schema", "test_faketensor"))
    # channel-last u, delta, z: the fake impl gives the real (channel-last) output strides
    cl = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (u, delta, z)]
    torch.library.opcheck(torch.ops.ssm_suite.selective_scan_fwd.default,
                          (cl[0], cl[1], A, B, C, D, cl[2], bias, True, None, False, None, False),
                          test_utils=("test_schema", "test_faketensor"))
    _, _, ckpt = ss_triton.selective_scan_fwd(u, delta, A, B, C, D, z, bias, True, init, True, None, True)
    torch.library.opcheck(torch.ops.ssm_suite.selective_scan_bwd.default,
                          (u, delta, A, B, C, D, z, bias, True, init, None, ckpt, torch.randn_like(u),
                           torch.randn_like(init)),
                          test_utils=("test_schema", "test_faketensor"))
    state = torch.randn(2, 3, 2, device=DEVICE)
    torch.library.opcheck(torch.ops.ssm_suite.selective_scan_step.default,
                          (state, u[..., 0].contiguous(), delta[..., 0].contiguous(), A, B[..., 0].contiguous(),
                           C[..., 0].contiguous(), D, None, bias, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_errors_name_the_limit():
    u, delta, A, B, C, *_ = make(1, 2, 3, 300, torch.float32, D=False, z=False, bias=False)
    with forced_backend("triton", "selective_scan"), pytest.raises(ValueError, match="N=300"):
        selective_scan(u, delta, A, B, C)
    u, delta, A, B, C, *_ = make(1, 2, 3, 2, torch.float32, D=False, z=False, bias=False)
    with forced_backend("triton", "selective_scan"), pytest.raises(ValueError, match="dtype"):
        selective_scan(u.to(torch.int32), delta, A, B, C)
    with forced_backend("triton", "selective_scan"), pytest.raises(ValueError, match="cu_seqlens"):
        selective_scan(u, delta, A, B, C, cu_seqlens=torch.tensor([0.0, 3.0], device=DEVICE))


def test_compiles_without_graph_breaks():
    # fullgraph: the custom ops are single nodes with fake impls; aot_eager traces the backward too
    u, delta, A, B, C, D, z, bias, init = make(1, 3, 6, 2, torch.float32, states=1)
    leaves = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias, init)]
    torch.library.opcheck(torch.ops.ssm_suite.selective_scan_fwd.default,
                          (*leaves[:8], True, leaves[8], True, None, True),
                          test_utils=("test_autograd_registration",))

    def fn(*args):
        y, final = ss_triton.selective_scan_triton(*args[:8], True, args[8], True)
        return y.sum() + final.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    grads_eager = torch.autograd.grad(fn(*leaves), leaves)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_eager))
