"""The fused Mamba-1 block step (Triton, on CPU through TRITON_INTERPRET=1 at small shapes) against its
op-by-op reference: the new residual stream, the partial sums of squares, and both states updated in
place; the three forms of the stream (x + residual, x alone, residual alone with the previous call's
partial sums); the register (GEMV) and tl.dot tile paths with x_proj through partials or one matmul;
odd sizes; float32 / bfloat16 / float16; a bfloat16 stream; determinism; torch.library checks; errors.

Low-precision runs are judged against the float64 reference: the fused step's error must stay within a
small multiple of the op-by-op step's own error, and close to the op-by-op step itself (both round at
the same places). What the interpreter cannot show, races between the threads of a program, only a GPU
run can: scripts/gpu_checks/mamba_decode.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kernels.dispatch import forced_backend
from kernels.mamba_decode import mamba1_decode_block
from kernels.mamba_decode.reference import mamba1_decode_block_reference

# The shared helpers beside this file (pytest imports tests with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_block import (DEVICE, check_sixteen_bit_state, copy, rel, run_block, stream_in,  # noqa: E402
                          triton_kernels, with_stream)

md_triton = triton_kernels("kernels.mamba_decode.triton")
import triton  # noqa: E402  (importable: triton_kernels skipped the module otherwise)

STATE_KEYS = ("conv_state", "ssm_state")


def make(batch, d_model=32, d_inner=64, d_state=8, dt_rank=2, width=4, dtype=torch.float32, stream="x+res",
         residual_dtype=torch.float32, conv_bias=True, use_D=True, seed=0):
    """Random block weights, states and stream of a Mamba-1 block (the layer's init scales, roughly)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    args = dict(
        conv_state=rnd(batch, d_inner, width - 1).to(dtype),
        ssm_state=rnd(batch, d_inner, d_state).float(),
        x=rnd(batch, d_model).to(dtype),
        residual=(2 * rnd(batch, d_model)).to(residual_dtype),
        norm_weight=(1 + 0.2 * rnd(d_model)).to(dtype), norm_eps=1e-5,
        in_proj_weight=(rnd(2 * d_inner, d_model) / d_model**0.5).to(dtype),
        conv_weight=(rnd(d_inner, width) / 2).to(dtype),
        conv_bias=(0.1 * rnd(d_inner)).to(dtype) if conv_bias else None,
        x_proj_weight=(rnd(dt_rank + 2 * d_state, d_inner) / d_inner**0.5).to(dtype),
        dt_proj_weight=(rnd(d_inner, dt_rank) / dt_rank**0.5).to(dtype),
        dt_bias=(0.5 * rnd(d_inner) - 2).float(),
        A=-torch.exp(0.5 * rnd(d_inner, d_state)).float(),
        D=rnd(d_inner).float() if use_D else None,
        out_proj_weight=(rnd(d_model, d_inner) / d_inner**0.5).to(dtype),
        residual_dtype=residual_dtype,
    )
    return with_stream(args, stream)


def run(backend: str, args: dict) -> tuple[dict, torch.Tensor]:
    return run_block(mamba1_decode_block, "mamba1_decode_block", backend, args)


def errors(ours: dict, ref: dict) -> dict:
    return {k: rel(ours[k], ref[k]) for k in ref}


@pytest.mark.parametrize("stream", ["x+res", "x", "res+ssq"])
@pytest.mark.parametrize("batch", [1, 3, 17])  # GEMV path with x_proj partials (1, 3); tl.dot (17)
def test_float32_matches_reference(batch, stream):
    args = make(batch, stream=stream, seed=batch)
    ours, res_out = run("triton", args)
    ref, ref_res_out = run("reference", args)
    assert res_out.dtype == torch.float32 and res_out.shape == (batch, 32)
    for key, err in errors(ours, ref).items():
        assert err < 2e-5, (key, err)
    # The outputs are not trivially the inputs: the block's output and the states moved.
    assert ours["delta"].norm() > 0.1 * stream_in(args).norm()
    assert rel(ours["ssm_state"], args["ssm_state"]) > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [2, 17])
def test_low_precision_within_the_op_by_op_error(dtype, batch):
    """Against the float64 reference, the fused step is about as accurate as the op-by-op step."""
    args = make(batch, dtype=dtype, seed=10 + batch)
    ours, _ = run("triton", args)
    ref_low, _ = run("reference", args)
    truth, _ = run("reference", copy(args, torch.float64))
    for key in truth:
        ours_err, ref_err = rel(ours[key], truth[key]), rel(ref_low[key], truth[key])
        assert ours_err < 3 * ref_err + 1e-4, (key, ours_err, ref_err)
        assert ours_err < (5e-2 if dtype == torch.bfloat16 else 1e-2), (key, ours_err)
        assert rel(ours[key], ref_low[key]) < 1e-3, key  # equal roundings: only the order of adds differs


@pytest.mark.parametrize("case", [
    dict(batch=2, d_model=40, d_inner=80, d_state=5, dt_rank=3, width=3, conv_bias=False, use_D=False),
    dict(batch=19, d_model=40, d_inner=80, d_state=5, dt_rank=3, width=2),
    dict(batch=1, d_model=24, d_inner=48, d_state=16, dt_rank=20, width=4, stream="res+ssq"),
], ids=["gemv-odd", "dot-odd", "gemv-wide-xproj"])
def test_odd_sizes(case):
    args = make(**case, seed=3)
    ours, _ = run("triton", args)
    ref, _ = run("reference", args)
    for key, err in errors(ours, ref).items():
        assert err < 2e-5, (key, err)


def test_bfloat16_stream():
    """residual_in_fp32=False: the stream itself is bfloat16 (rounded after each add)."""
    args = make(2, dtype=torch.bfloat16, residual_dtype=torch.bfloat16, seed=4)
    ours, res_out = run("triton", args)
    truth, _ = run("reference", copy(args, torch.float64))
    ref_low, _ = run("reference", args)
    assert res_out.dtype == torch.bfloat16
    for key in truth:
        assert rel(ours[key], truth[key]) < 3 * rel(ref_low[key], truth[key]) + 1e-4, key


@pytest.mark.parametrize("override", [
    {"small_batch": 0},  # batch 3 through the tl.dot tiles
    {"small": {**md_triton.TILES["small"], "part": False}},  # GEMV tiles, x_proj as one matmul
    {"small": {**md_triton.TILES["small"], "BC": 32, "BN": 16, "elems": 1024}},  # other GEMV tiles
    {"small": {**md_triton.TILES["small"], "pre": False}},  # chunked GEMV kernels, loads after the wait
    {"small": {**md_triton.TILES["small"], "pre_elems_per_warp": 32}},  # whole-row scan kernel only
    {"large": {**md_triton.TILES["large"], "BB1": 16, "BC": 16, "BK1": 16, "BB2": 1, "BD": 16, "BB3": 16,
               "BN": 16, "BK3": 16}},  # small dot tiles, register dt product (BB2 < 16)
])
def test_tile_variants(override, monkeypatch):
    tiles = {**md_triton.TILES, **override}
    monkeypatch.setattr(md_triton, "TILES", tiles)
    batch = 3 if "small" in override or "small_batch" in override else 20
    args = make(batch, stream="res+ssq", seed=5)
    ours, _ = run("triton", args)
    ref, _ = run("reference", args)
    for key, err in errors(ours, ref).items():
        assert err < 2e-5, (key, err)


def test_deterministic():
    args = make(17, seed=6)
    first, res_a = run("triton", args)
    second, res_b = run("triton", args)
    assert torch.equal(res_a, res_b)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_tiles_choice():
    """mamba1-130m's shape: the GEMV path with x_proj partials at batch 1, tl.dot with one x_proj matmul
    at batch 64; the partial sums of squares come in ceil(d_model / BN) rows."""
    small = md_triton.tiles(1, 768, 1536, 16, 48)
    large = md_triton.tiles(64, 768, 1536, 16, 48)
    assert not small["DOT"] and small["PART"] and small["NQ"] == triton.cdiv(768, small["BN"])
    # Whole rows before the wait at batch 1 (kernel 1 over 1024 >= 768 features, kernel 3 over 2048 >= 1536,
    # kernel 2 with all 96 partials in one tile); at batch 4 kernel 1 takes 8 warps for its larger product,
    # and a d_model past 8 warps' worth takes the chunked kernel.
    assert small["PRE1"] and small["PRE2"] and small["PRE3"] and small["warps1"] == small["warps3"] == 4
    assert small["BK1"] == 1024 and small["BK3"] == 2048 and small["BP"] >= small["NP"]
    four = md_triton.tiles(4, 768, 1536, 16, 48)
    assert four["PRE1"] and four["PRE2"] and four["PRE3"] and four["warps1"] == 8
    wide = md_triton.tiles(4, 2560, 5120, 16, 160)
    assert not wide["PRE1"] and not wide["PRE3"] and wide["PRE2"]
    assert not large["PRE1"] and not large["PRE2"] and not large["PRE3"]
    assert large["DOT"] and not large["PART"] and large["DOT2"]
    # A large state shrinks the scan tile and keeps dt in registers.
    assert not md_triton.tiles(64, 768, 1536, 128, 48)["DOT2"]


def test_library_op_checks():
    args = make(2, stream="res+ssq", seed=7)
    op_args = (args["conv_state"], args["ssm_state"], None, args["residual"], args["norm_weight"], 1e-5,
               args["in_proj_weight"], args["conv_weight"], args["conv_bias"], args["x_proj_weight"],
               args["dt_proj_weight"], args["dt_bias"], args["A"], args["D"], args["out_proj_weight"],
               torch.float32, args["residual_sumsq"])
    torch.library.opcheck(md_triton.mamba1_decode_block_op, op_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_errors():
    args = make(2)
    with pytest.raises(ValueError, match="give x"):
        mamba1_decode_block(**{**copy(args), "x": None, "residual": None})
    with pytest.raises(ValueError, match="in_proj_weight must be"):
        mamba1_decode_block(**{**copy(args), "in_proj_weight": args["in_proj_weight"][:, :-1]})
    with pytest.raises(ValueError, match="residual_sumsq describes"):
        mamba1_decode_block(**{**copy(args), "residual_sumsq": torch.zeros(1, 2, device=DEVICE)})
    with pytest.raises(ValueError, match="share"):
        mamba1_decode_block(**{**copy(args), "out_proj_weight": args["out_proj_weight"].double()})
    with forced_backend("triton", "mamba1_decode_block"), pytest.raises(ValueError, match="op-by-op"):
        mamba1_decode_block(**copy(args, torch.float64))
    with forced_backend("triton", "mamba1_decode_block"), pytest.raises(ValueError, match="ssm_state must be"):
        mamba1_decode_block(**{**copy(args), "ssm_state": args["ssm_state"].double()})
    assert md_triton.unsupported(32, 64, 300, 2, 4, torch.float32) is not None
    assert md_triton.unsupported(32, 64, 8, 2, 9, torch.float32) is not None
    assert md_triton.unsupported(32, 64, 8, 2, 4, torch.bfloat16) is None


def test_reference_is_the_op_by_op_block():
    """The reference composes exactly what decode_step runs op by op: norm, Mamba1 step, residual add."""
    from core.config import Mamba1Config
    from core.layers.mamba1 import Mamba1
    from kernels.norm import rms_norm

    torch.manual_seed(0)
    mixer = Mamba1(32, Mamba1Config(d_state=8, conv_bias=True)).double()
    with torch.no_grad():
        mixer.D.normal_()
    weight = 1 + 0.2 * torch.randn(32, dtype=torch.float64)
    cache = mixer.allocate_cache(3)
    torch.nn.init.normal_(cache.conv_state)
    torch.nn.init.normal_(cache.ssm_state)
    states = (cache.conv_state.clone(), cache.ssm_state.clone())
    x, residual = torch.randn(3, 32, dtype=torch.float64), torch.randn(3, 32, dtype=torch.float64)
    with torch.no_grad():
        h, stream = rms_norm(x, weight, 1e-5, residual=residual, residual_out_dtype=torch.float64)
        expected = stream + mixer(h[:, None], cache=cache)[:, 0]
        got, sumsq = mamba1_decode_block_reference(
            states[0], states[1], x, residual, weight, 1e-5, **mixer.fused_step_weights(),
            residual_dtype=torch.float64)
    assert rel(got, expected) < 1e-14
    assert rel(sumsq[0], expected.square().sum(-1)) < 1e-14
    assert torch.allclose(states[0], cache.conv_state) and torch.allclose(states[1], cache.ssm_state)


# ----------------------------------------------------------------------------------------------
# dt_proj + scan in one kernel (mamba1_scan_step), the op-by-op step's tail at large batch


def scan_step_args(batch, d_inner=80, d_state=5, dt_rank=3, dtype=torch.float32, use_D=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    args = dict(ssm_state=rnd(batch, d_inner, d_state).float(), x=rnd(batch, d_inner).to(dtype),
                z=rnd(batch, d_inner).to(dtype), x_dbl=rnd(batch, dt_rank + 2 * d_state).to(dtype),
                dt_proj_weight=(rnd(d_inner, dt_rank) / dt_rank**0.5).to(dtype), dt_bias=(0.5 * rnd(d_inner) - 2).float(),
                A=-torch.exp(0.5 * rnd(d_inner, d_state)).float(), D=rnd(d_inner).float() if use_D else None)
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def run_scan_step(backend, args):
    from kernels.mamba_decode import mamba1_scan_step

    args = copy(args)
    with forced_backend(backend, "mamba1_scan_step"):
        y = mamba1_scan_step(**args)
    return y, args["ssm_state"]


@pytest.mark.parametrize("batch,use_D", [(1, True), (3, False), (17, True), (40, True)])  # GEMV (1, 3); tl.dot
def test_scan_step_matches_reference(batch, use_D):
    args = scan_step_args(batch, use_D=use_D, seed=batch)
    y, state = run_scan_step("triton", args)
    y_ref, state_ref = run_scan_step("reference", args)
    assert y.shape == (batch, 80) and y.dtype == torch.float32
    assert rel(y, y_ref) < 2e-5 and rel(state, state_ref) < 2e-5
    assert rel(state, args["ssm_state"]) > 1e-2  # the state moved


@pytest.mark.parametrize("batch", [2, 17])
def test_scan_step_bfloat16_rounds_like_the_op_by_op_step(batch):
    args = scan_step_args(batch, d_inner=64, d_state=16, dt_rank=4, dtype=torch.bfloat16, seed=7)
    y, state = run_scan_step("triton", args)
    y_ref, state_ref = run_scan_step("reference", args)
    assert y.dtype == torch.bfloat16
    assert rel(y, y_ref) < 1e-2 and rel(state, state_ref) < 1e-3


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [2, 17])  # GEMV and tl.dot tiles
def test_sixteen_bit_states_are_updated_in_float32_and_stored_rounded(state_dtype, batch):
    # The state in 16 bits (generate(ssm_state_dtype=...), as mamba_ssm keeps it): both kernels load it,
    # update it in float32 and store it rounded, as the reference steps do.
    args = scan_step_args(batch, d_inner=64, d_state=16, dt_rank=4, dtype=torch.bfloat16, seed=3)
    args["ssm_state"] = args["ssm_state"].to(state_dtype)
    y, state = run_scan_step("triton", args)
    y_ref, state_ref = run_scan_step("reference", args)
    assert state.dtype == state_dtype and rel(state, state_ref) < 1e-2 and rel(y, y_ref) < 1e-2
    assert rel(state, args["ssm_state"]) > 1e-2  # the state moved
    check_sixteen_bit_state(mamba1_decode_block, "mamba1_decode_block", make(batch, dtype=torch.bfloat16, seed=4),
                            state_dtype)


def test_scan_step_rejects_what_its_kernel_cannot_take():
    from kernels.mamba_decode import mamba1_scan_step

    args = scan_step_args(2)
    with forced_backend("triton", "mamba1_scan_step"), pytest.raises(ValueError, match="float32"):
        mamba1_scan_step(**{**args, "ssm_state": args["ssm_state"].double()})
    with pytest.raises(ValueError, match="x_dbl must be"):
        mamba1_scan_step(**{**args, "x_dbl": args["x_dbl"][:, :-1]})
