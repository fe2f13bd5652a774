"""SSD (Mamba-2): the chunked form against the quadratic and sequential forms, and those against a naive
loop written from the recurrence; forward and backward, states, packed sequences, the step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.dispatch import choose_backend, forced_backend
from kernels.ssd import ssd, ssd_quadratic, ssd_step
from kernels.ssd.chunked import ssd_chunked
from kernels.ssd.reference import ssd_reference

FORMS = {"chunked": ssd_chunked, "quadratic": ssd_quadratic, "sequential": ssd_reference}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(batch=2, L=7, H=4, P=3, G=2, N=5, dtype=torch.float64, D_per_dim=False, seed=0,
                states=None, requires_grad=False):
    """Random SSD inputs with the raw dt around the softplus knee and A in a Mamba-2-like range."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    inputs = dict(
        x=randn(batch, L, H, P),
        dt=randn(batch, L, H),
        A=-(torch.rand(H, generator=gen, dtype=torch.float64) * 3 + 0.2).to(dtype),
        B=randn(batch, L, G, N),
        C=randn(batch, L, G, N),
        D=randn(H, P) if D_per_dim else randn(H),
        z=randn(batch, L, H, P),
        dt_bias=randn(H, scale=0.5),
        initial_state=randn(batch if states is None else states, H, P, N),
    )
    if requires_grad:
        for value in inputs.values():
            value.requires_grad_(True)
    return inputs


def run(form, inputs, chunk_size=16, **kwargs):
    kwargs = {"dt_softplus": True, "return_final_state": True, **kwargs}
    inp = dict(inputs)
    return FORMS[form](inp.pop("x"), inp.pop("dt"), inp.pop("A"), inp.pop("B"), inp.pop("C"), chunk_size,
                       **inp, **kwargs)


def naive_ssd(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_limit=(0.0, math.inf)):
    """The recurrence written out with explicit batch, head and time loops (float64, no broadcasting
    tricks): an independent check of the reference."""
    batch, L, H, P = x.shape
    G = B.shape[2]
    y = torch.zeros(batch, L, H, P, dtype=torch.float64)
    final = torch.zeros(batch, H, P, B.shape[3], dtype=torch.float64)
    for b in range(batch):
        for h in range(H):
            g = h // (H // G)
            state = initial_state[b, h].clone()
            for t in range(L):
                step = F.softplus(dt[b, t, h] + dt_bias[h]).clamp(*dt_limit)
                state = torch.exp(step * A[h]) * state + step * torch.outer(x[b, t, h], B[b, t, g])
                out = state @ C[b, t, g] + (D[h] if D.dim() == 1 else D[h]) * x[b, t, h]
                y[b, t, h] = out * F.silu(z[b, t, h])
            final[b, h] = state
    return y, final


@pytest.mark.parametrize("D_per_dim", [False, True])
@pytest.mark.parametrize("G", [1, 2])
def test_sequential_reference_matches_naive_loop(G, D_per_dim):
    inputs = make_inputs(batch=2, L=6, H=4, G=G, D_per_dim=D_per_dim)
    y, final = run("sequential", inputs, dt_limit=(0.05, 1.5))
    y_naive, final_naive = naive_ssd(**inputs, dt_limit=(0.05, 1.5))
    assert rel(y, y_naive) < 1e-13
    assert rel(final, final_naive) < 1e-13


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("L,chunk_size", [(1, 16), (7, 16), (16, 16), (65, 16), (65, 32), (130, 32), (130, 16)])
def test_forms_agree_forward(L, chunk_size, G):
    inputs = make_inputs(L=L, G=G, D_per_dim=(L % 2 == 1), seed=L)
    y_seq, final_seq = run("sequential", inputs)
    for form in ("chunked", "quadratic"):
        y, final = run(form, inputs, chunk_size=chunk_size)
        assert rel(y, y_seq) < 1e-12, form
        assert rel(final, final_seq) < 1e-12, form


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
def test_chunk_size_does_not_change_the_result(chunk_size):
    inputs = make_inputs(L=29, G=2, seed=3)
    y_ref, final_ref = run("sequential", inputs)
    y, final = run("chunked", inputs, chunk_size=chunk_size)
    assert rel(y, y_ref) < 1e-12 and rel(final, final_ref) < 1e-12


@pytest.mark.parametrize("D_per_dim", [False, True])
@pytest.mark.parametrize("L,G", [(1, 1), (7, 2), (37, 1), (37, 4)])
def test_forms_agree_backward(L, G, D_per_dim):
    """Gradients of every input, through y and the final state, by all three forms."""
    grads = {}
    gen = torch.Generator().manual_seed(11)
    for form in FORMS:
        inputs = make_inputs(L=L, G=G, D_per_dim=D_per_dim, seed=L + G, requires_grad=True)
        y, final = run(form, inputs, chunk_size=16, dt_limit=(0.0, 2.0))
        gen.manual_seed(11)
        w_y = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        w_f = torch.randn(final.shape, generator=gen, dtype=torch.float64)
        ((y * w_y).sum() + (final * w_f).sum()).backward()
        grads[form] = {name: t.grad for name, t in inputs.items()}
    for name, grad in grads["sequential"].items():
        assert grad is not None and grad.abs().sum() > 0, name
        for form in ("chunked", "quadratic"):
            assert rel(grads[form][name], grad) < 1e-11, (form, name)


def test_gradcheck_chunked():
    inputs = make_inputs(batch=1, L=5, H=2, P=2, G=1, N=3, seed=4, requires_grad=True)
    names = list(inputs)

    def fn(*tensors):
        y, final = run("chunked", dict(zip(names, tensors)), chunk_size=2)
        return y, final

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()), fast_mode=True)


def test_dt_limit_and_softplus_semantics():
    """dt = clamp(softplus(dt + dt_bias), lo, hi): equal to passing that dt already discretized."""
    inputs = make_inputs(L=20, seed=5)
    limit = (0.3, 0.9)
    discretized = F.softplus(inputs["dt"] + inputs["dt_bias"]).clamp(*limit)
    assert (discretized == limit[0]).any() and (discretized == limit[1]).any()  # the clamp is exercised
    plain = dict(inputs, dt=discretized, dt_bias=None)
    for form in FORMS:
        y, final = run(form, inputs, dt_limit=limit)
        y_pre, final_pre = run(form, plain, dt_softplus=False)
        assert rel(y, y_pre) < 1e-13 and rel(final, final_pre) < 1e-13
        y_free, _ = run(form, inputs)
        assert rel(y_free, y) > 1e-3  # the limit changes the result


def test_without_softplus_a_negative_dt_is_clamped_to_zero():
    """As in mamba_ssm, the default dt_limit (0, inf) applies even without softplus."""
    inputs = make_inputs(L=9, seed=6)
    inputs["dt_bias"] = None
    y, final = run("chunked", inputs, dt_softplus=False)
    y_relu, final_relu = run("sequential", dict(inputs, dt=inputs["dt"].clamp_min(0)), dt_softplus=False)
    assert rel(y, y_relu) < 1e-13 and rel(final, final_relu) < 1e-13


def test_no_initial_state_equals_zero_state_and_no_options():
    inputs = make_inputs(L=11, seed=7)
    y0, f0 = run("chunked", dict(inputs, initial_state=torch.zeros_like(inputs["initial_state"])))
    y1, f1 = run("chunked", dict(inputs, initial_state=None))
    assert rel(y1, y0) < 1e-15 and rel(f1, f0) < 1e-15
    # Without D, z, dt_bias: the bare scan.
    bare = {k: v for k, v in inputs.items() if k in ("x", "dt", "A", "B", "C")}
    y_c = run("chunked", bare, dt_softplus=False, return_final_state=False)
    y_s = run("sequential", bare, dt_softplus=False, return_final_state=False)
    assert isinstance(y_c, torch.Tensor) and rel(y_c, y_s) < 1e-12


@pytest.mark.parametrize("split", [1, 16, 23])
def test_state_passing_split_equals_full(split):
    inputs = make_inputs(L=40, G=2, seed=8)
    y_full, final_full = run("chunked", inputs)
    first = {k: (v[:, :split] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inputs.items()}
    second = {k: (v[:, split:] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inputs.items()}
    y1, state = run("chunked", first)
    y2, final = run("chunked", dict(second, initial_state=state))
    assert rel(torch.cat([y1, y2], dim=1), y_full) < 1e-12
    assert rel(final, final_full) < 1e-12


@pytest.mark.parametrize("backend", ["chunked", "reference"])
@pytest.mark.parametrize("with_state", [True, False])
def test_varlen_equals_separate_runs(backend, with_state):
    """Packed sequences (one empty, one shorter than a chunk, one over several chunks) give the outputs,
    final states and gradients of separate runs."""
    lengths = [5, 0, 1, 19, 9]
    S, total = len(lengths), sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    packed = make_inputs(batch=1, L=total, G=2, D_per_dim=True, states=S, seed=9, requires_grad=True)
    if not with_state:
        packed["initial_state"] = None
    with forced_backend(backend, "ssd"):
        inp = dict(packed)
        y, final = ssd(inp.pop("x"), inp.pop("dt"), inp.pop("A"), inp.pop("B"), inp.pop("C"), 8,
                       dt_softplus=True, return_final_state=True, cu_seqlens=cu, **inp)
    assert final.shape == (S, 4, 3, 5)
    (y.square().sum() + final.square().sum()).backward()

    separate = make_inputs(batch=1, L=total, G=2, D_per_dim=True, states=S, seed=9, requires_grad=True)
    if not with_state:
        separate["initial_state"] = None
    ys, finals = [], []
    for s in range(S):
        part = slice(cu[s].item(), cu[s + 1].item())
        seq = {k: (v[:, part] if k in ("x", "dt", "B", "C", "z") else v) for k, v in separate.items()}
        seq["initial_state"] = None if not with_state else separate["initial_state"][s : s + 1]
        y_s, f_s = run("sequential", seq)
        ys.append(y_s)
        finals.append(f_s)
    y_sep, final_sep = torch.cat(ys, dim=1), torch.cat(finals, dim=0)
    (y_sep.square().sum() + final_sep.square().sum()).backward()
    assert rel(y, y_sep) < 1e-12
    assert rel(final, final_sep) < 1e-12
    if with_state:  # the empty sequence hands its initial state straight through
        assert torch.equal(final[1], packed["initial_state"][1])
    for name, t in packed.items():
        if t is not None:
            assert rel(t.grad, separate[name].grad) < 1e-11, name


@pytest.mark.parametrize("D_per_dim", [False, True])
def test_step_matches_scan(D_per_dim):
    inputs = make_inputs(L=9, G=2, D_per_dim=D_per_dim, seed=10)
    limit = (0.01, 1.0)
    y_scan, final_scan = run("chunked", inputs, chunk_size=4, dt_limit=limit)
    state = inputs["initial_state"].clone()
    storage = state.data_ptr()
    ys = []
    for t in range(inputs["x"].shape[1]):
        ys.append(ssd_step(state, inputs["x"][:, t], inputs["dt"][:, t], inputs["A"], inputs["B"][:, t],
                           inputs["C"][:, t], D=inputs["D"], z=inputs["z"][:, t], dt_bias=inputs["dt_bias"],
                           dt_softplus=True, dt_limit=limit))
    assert state.data_ptr() == storage  # updated in place
    assert rel(torch.stack(ys, dim=1), y_scan) < 1e-12
    assert rel(state, final_scan) < 1e-12


def test_float32_against_float64_reference():
    inputs64 = make_inputs(L=150, G=2, seed=12)
    inputs32 = {k: v.float() for k, v in inputs64.items()}
    y, final = run("chunked", inputs32, chunk_size=32)
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    y64, final64 = run("sequential", inputs64)
    assert rel(y, y64) < 1e-5 and rel(final, final64) < 1e-5


def test_bfloat16_forward():
    inputs = {k: v.to(torch.bfloat16) for k, v in make_inputs(L=40, G=2, seed=13).items()}
    y, final = run("chunked", inputs, chunk_size=16)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    y64, final64 = run("sequential", {k: v.double() for k, v in inputs.items()})
    assert final64.dtype == torch.float64
    assert rel(y, y64) < 1e-2 and rel(final, final64) < 1e-5


def test_strong_decay_stays_finite():
    """Large dt * A (decays of exp(-1000) within a chunk) must neither overflow nor produce NaN gradients."""
    inputs = make_inputs(L=70, seed=14, requires_grad=False)
    inputs["A"] = torch.full((4,), -60.0, dtype=torch.float64)
    inputs["dt"] = inputs["dt"] * 5 + 5
    for value in inputs.values():
        value.requires_grad_(True)
    y, final = run("chunked", {k: v.float() for k, v in inputs.items()}, chunk_size=64)
    (y.sum() + final.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    assert all(torch.isfinite(v.grad).all() for v in inputs.values())
    y64, _ = run("sequential", {k: v.detach() for k, v in inputs.items()})
    assert rel(y, y64) < 1e-5


def test_dispatch_defaults_to_chunked_on_cpu_and_can_be_forced():
    assert choose_backend("ssd", ("reference", "chunked"), torch.device("cpu")) == "chunked"
    inputs = make_inputs(L=5, seed=15)
    inp = dict(inputs)
    args = (inp.pop("x"), inp.pop("dt"), inp.pop("A"), inp.pop("B"), inp.pop("C"), 4)
    with forced_backend("reference", "ssd"):
        y_ref = ssd(*args, **inp, dt_softplus=True)
    assert rel(ssd(*args, **inp, dt_softplus=True), y_ref) < 1e-12


def test_clear_errors():
    inputs = make_inputs(L=6, H=4, G=2)
    x, dt, A, B, C = (inputs[k] for k in ("x", "dt", "A", "B", "C"))
    with pytest.raises(ValueError, match="must divide nheads"):
        ssd(x, dt, A, B.repeat(1, 1, 2, 1)[:, :, :3], C.repeat(1, 1, 2, 1)[:, :, :3], 4)
    with pytest.raises(ValueError, match="dt must be"):
        ssd(x, dt[:, :-1], A, B, C, 4)
    with pytest.raises(ValueError, match=r"x of shape \[B, L, H, P\]"):
        ssd(x[0], dt, A, B, C, 4)
    with pytest.raises(ValueError, match="A must be"):
        ssd(x, dt, A[:2], B, C, 4)
    with pytest.raises(ValueError, match="D must be"):
        ssd(x, dt, A, B, C, 4, D=torch.ones(3))
    with pytest.raises(ValueError, match="C must have"):
        ssd(x, dt, A, B, C[..., :2], 4)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(x, dt, A, B, C, 0)
    with pytest.raises(ValueError, match="initial_state"):
        ssd(x, dt, A, B, C, 4, initial_state=torch.zeros(2, 4, 3, 4))
    with pytest.raises(ValueError, match="dt_limit"):
        ssd(x, dt, A, B, C, 4, dt_limit=(1.0, 0.5))
    with pytest.raises(ValueError, match="batch 1"):
        ssd(x, dt, A, B, C, 4, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="rise from 0"):
        ssd(x[:1], dt[:1], A, B[:1], C[:1], 4, cu_seqlens=torch.tensor([0, 2, 5]))
    state = torch.zeros(2, 4, 3, 5)
    with pytest.raises(ValueError, match="must divide nheads"):
        ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0, :1].expand(2, 3, 5), C[:, 0, :1].expand(2, 3, 5))
    with pytest.raises(ValueError, match="state must be"):
        ssd_step(state[..., :4], x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    with pytest.raises(ValueError, match="dt must be"):
        ssd_step(state, x[:, 0], dt[:, 0, :2], A, B[:, 0], C[:, 0])
