"""The fused Mamba-2 block step (Triton, on CPU through TRITON_INTERPRET=1 at small shapes) against its
op-by-op reference: the new residual stream, the partial sums of squares, and both states updated in
place; the three forms of the stream (x + residual, x alone, residual alone with the previous call's
partial sums); the register (GEMV) and tl.dot tile paths; several norm groups, D per head or per
channel, a dt clamp, odd sizes; float32 / bfloat16 / float16; a bfloat16 stream; determinism;
torch.library checks; errors. The reference itself is checked against rms_norm + Mamba2.forward(cache)
+ the residual add in float64.

Low-precision runs are judged against the float64 reference: the fused step's error must stay within a
small multiple of the op-by-op step's own error, and close to the op-by-op step. Races between the
threads of a program only a GPU run can show: scripts/gpu_checks/mamba_decode.py."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from kernels.dispatch import forced_backend
from kernels.mamba_decode import mamba2_decode_block

# The shared helpers beside this file (pytest imports tests with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_block import (DEVICE, check_sixteen_bit_state, copy, rel, run_block, stream_in,  # noqa: E402
                          triton_kernels, with_stream)

m2 = triton_kernels("kernels.mamba_decode.triton_mamba2")
import triton  # noqa: E402  (importable: triton_kernels skipped the module otherwise)

OP = "mamba2_decode_block"


def make(batch, d_model=32, nheads=4, headdim=8, d_state=8, ngroups=2, width=4, dtype=torch.float32,
         stream="x+res", residual_dtype=torch.float32, conv_bias=True, D="head", dt_limit=(0.0, math.inf),
         seed=0):
    """Random weights, states and stream of a Mamba-2 block (the layer's init scales, roughly)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    d_inner = nheads * headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    args = dict(
        conv_state=rnd(batch, conv_dim, width - 1).to(dtype),
        ssm_state=rnd(batch, nheads, headdim, d_state).float(),
        x=rnd(batch, d_model).to(dtype),
        residual=(2 * rnd(batch, d_model)).to(residual_dtype),
        norm_weight=(1 + 0.2 * rnd(d_model)).to(dtype), norm_eps=1e-5,
        in_proj_weight=(rnd(d_inner + conv_dim + nheads, d_model) / d_model**0.5).to(dtype),
        conv_weight=(rnd(conv_dim, width) / 2).to(dtype),
        conv_bias=(0.1 * rnd(conv_dim)).to(dtype) if conv_bias else None,
        dt_bias=(0.5 * rnd(nheads) - 2).float(),
        A=-torch.exp(0.5 * rnd(nheads)).float(),
        D={"head": rnd(nheads), "dim": rnd(nheads, headdim), None: None}[D],
        dt_limit=dt_limit,
        gate_norm_weight=(1 + 0.2 * rnd(d_inner)).to(dtype), gate_norm_eps=1e-5,
        out_proj_weight=(rnd(d_model, d_inner) / d_inner**0.5).to(dtype),
        residual_dtype=residual_dtype,
    )
    if args["D"] is not None:
        args["D"] = args["D"].float()
    return with_stream(args, stream)


def run(backend: str, args: dict) -> tuple[dict, torch.Tensor]:
    return run_block(mamba2_decode_block, OP, backend, args)


def check_close(args: dict, tol: float = 2e-5) -> None:
    ours, _ = run("triton", args)
    ref, _ = run("reference", args)
    for key in ref:
        err = rel(ours[key], ref[key])
        assert err < tol, (key, err)


@pytest.mark.parametrize("stream", ["x+res", "x", "res+ssq"])
@pytest.mark.parametrize("batch", [1, 3, 17])  # GEMV tiles (1, 3); tl.dot (17)
def test_float32_matches_reference(batch, stream):
    args = make(batch, stream=stream, seed=batch)
    ours, res_out = run("triton", args)
    ref, _ = run("reference", args)
    assert res_out.dtype == torch.float32 and res_out.shape == (batch, 32)
    for key in ref:
        assert rel(ours[key], ref[key]) < 2e-5, (key, rel(ours[key], ref[key]))
    # The outputs are not trivially the inputs: the block's output and the states moved.
    assert ours["delta"].norm() > 0.05 * stream_in(args).norm()
    assert rel(ours["ssm_state"], args["ssm_state"]) > 1e-2
    assert rel(ours["conv_state"], args["conv_state"]) > 1e-1


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
        assert rel(ours[key], ref_low[key]) < 2e-2, key  # equal roundings: only the order of adds differs


@pytest.mark.parametrize("case", [
    # odd headdim / d_state / d_model / width, no conv bias, no D, one group
    dict(batch=2, d_model=40, nheads=3, headdim=6, d_state=5, ngroups=1, width=3, conv_bias=False, D=None),
    # tl.dot tiles, D per channel, a dt clamp that binds, 3 groups
    dict(batch=19, d_model=24, nheads=6, headdim=4, d_state=4, ngroups=3, width=2, D="dim", dt_limit=(0.05, 0.3)),
    # the stream from the previous fused block, group size of a single head
    dict(batch=1, d_model=16, nheads=4, headdim=8, d_state=16, ngroups=4, stream="res+ssq", dt_limit=(0.0, 0.2)),
], ids=["gemv-odd", "dot-odd-clamp", "gemv-4groups"])
def test_odd_sizes(case):
    check_close(make(**case, seed=3))


def test_several_state_blocks_per_head(monkeypatch):
    """A headdim split over several scan programs: the gated norm sums their partials."""
    monkeypatch.setitem(m2.TILES, "state", 16)  # BP = 16 // BN = 2 channels per program
    args = make(3, headdim=8, d_state=8, seed=8)
    assert m2.tiles(3, 32, 32, 4, 8, 8, 2)["NPB"] == 4
    check_close(args)


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
    {"small": {**m2.TILES["small"], "BC": 32, "BN": 16, "elems": 1024}},  # other GEMV tiles
    {"small": {**m2.TILES["small"], "pre": False}},  # chunked GEMV kernels, loads after the wait
    {"large": {**m2.TILES["large"], "BB1": 16, "BC": 16, "BK1": 16, "BB3": 16, "BN": 16, "BK3": 16}},
])
@pytest.mark.parametrize("ngroups", [1, 2])  # one norm group: kernel 3 over whole rows too
def test_tile_variants(override, ngroups, monkeypatch):
    monkeypatch.setattr(m2, "TILES", {**m2.TILES, **override})
    batch = 3 if "small" in override or "small_batch" in override else 20
    check_close(make(batch, stream="res+ssq", ngroups=ngroups, seed=5))


def test_deterministic():
    args = make(17, seed=6)
    first, res_a = run("triton", args)
    second, res_b = run("triton", args)
    assert torch.equal(res_a, res_b)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_tiles_choice():
    """mamba2-130m's shape (d_model 768, 24 heads of 64, N 128, 1 group): GEMV at batch 1, tl.dot at 64;
    the scan's state tile stays at 4096 elements (BP 32: two programs per head)."""
    small = m2.tiles(1, 768, 1536, 24, 64, 128, 1)
    large = m2.tiles(64, 768, 1536, 24, 64, 128, 1)
    assert not small["DOT"] and large["DOT"]
    assert small["BP"] * small["BNS"] == 4096 and small["NPB"] == 2 and small["NPG"] == 48
    assert small["NQ"] == triton.cdiv(768, small["BN"])
    # Whole rows before the wait at batch 1; kernel 3 only for one norm group.
    assert small["PRE1"] and small["PRE2"] and small["PRE3"] and small["BK1"] == 1024 and small["BK3"] == 2048
    assert not m2.tiles(1, 768, 1536, 24, 64, 128, 2)["PRE3"]
    assert not (large["PRE1"] or large["PRE2"] or large["PRE3"])


def test_library_op_checks():
    args = make(2, stream="res+ssq", seed=7)
    op_args = (args["conv_state"], args["ssm_state"], None, args["residual"], args["norm_weight"], 1e-5,
               args["in_proj_weight"], args["conv_weight"], args["conv_bias"], args["dt_bias"], args["A"],
               args["D"], 0.0, math.inf, args["gate_norm_weight"], 1e-5, args["out_proj_weight"], torch.float32,
               args["residual_sumsq"])
    torch.library.opcheck(m2.mamba2_decode_block_op, op_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_errors():
    args = make(2)
    with pytest.raises(ValueError, match="give x"):
        mamba2_decode_block(**{**copy(args), "x": None, "residual": None})
    with pytest.raises(ValueError, match="in_proj_weight must be"):
        mamba2_decode_block(**{**copy(args), "in_proj_weight": args["in_proj_weight"][:, :-1]})
    with pytest.raises(ValueError, match="conv_dim"):
        mamba2_decode_block(**{**copy(args), "conv_weight": args["conv_weight"][:-1],
                               "conv_state": args["conv_state"][:, :-1]})
    with pytest.raises(ValueError, match="H x P"):
        mamba2_decode_block(**{**copy(args), "gate_norm_weight": args["gate_norm_weight"][:-1]})
    with pytest.raises(ValueError, match="D must be"):
        mamba2_decode_block(**{**copy(args), "D": torch.ones(3, device=DEVICE)})
    with pytest.raises(ValueError, match="residual_sumsq describes"):
        mamba2_decode_block(**{**copy(args), "residual_sumsq": torch.zeros(1, 2, device=DEVICE)})
    with pytest.raises(ValueError, match="share"):
        mamba2_decode_block(**{**copy(args), "out_proj_weight": args["out_proj_weight"].double()})
    with forced_backend("triton", OP), pytest.raises(ValueError, match="op-by-op"):
        mamba2_decode_block(**copy(args, torch.float64))
    with forced_backend("triton", OP), pytest.raises(ValueError, match="ssm_state must be"):
        mamba2_decode_block(**{**copy(args), "ssm_state": args["ssm_state"].double()})
    assert m2.unsupported(32, 64, 8, 8, 300, 1, 4, torch.float32) is not None
    assert m2.unsupported(32, 64, 8, 8, 16, 1, 9, torch.float32) is not None
    assert m2.unsupported(32, 64, 8, 8, 16, 3, 4, torch.float32) is not None
    assert m2.unsupported(768, 1536, 24, 64, 128, 1, 4, torch.bfloat16) is None


@pytest.mark.parametrize("stream", ["x+res", "x"])
@pytest.mark.parametrize("d_has_hdim", [False, True])
def test_reference_is_the_op_by_op_block(stream, d_has_hdim):
    """The reference composes exactly what decode_step runs op by op: norm, Mamba2 step, residual add."""
    from core.config import Mamba2Config
    from core.layers.mamba2 import Mamba2
    from kernels.norm import rms_norm

    torch.manual_seed(0)
    config = Mamba2Config(d_state=8, headdim=8, ngroups=2, D_has_hdim=d_has_hdim, dt_limit_max=0.08)
    mixer = Mamba2(16, config).double()
    with torch.no_grad():
        mixer.D.normal_()
        mixer.norm.weight.normal_(1.0, 0.2)
    weight = 1 + 0.2 * torch.randn(16, dtype=torch.float64)
    cache = mixer.allocate_cache(3)
    torch.nn.init.normal_(cache.conv_state)
    torch.nn.init.normal_(cache.ssm_state)
    states = (cache.conv_state.clone(), cache.ssm_state.clone())
    x, residual = torch.randn(3, 16, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    if stream == "x":
        residual = None
    with torch.no_grad():
        h, r = rms_norm(x, weight, 1e-5, residual=residual, residual_out_dtype=torch.float64)
        expected = r + mixer(h[:, None], cache=cache)[:, 0]
        with forced_backend("reference", OP):
            got, sumsq = mamba2_decode_block(states[0], states[1], x, residual, weight, 1e-5,
                                             **mixer.fused_step_weights(), residual_dtype=torch.float64)
    assert rel(got, expected) < 1e-14
    assert rel(sumsq[0], expected.square().sum(-1)) < 1e-14
    assert torch.allclose(states[0], cache.conv_state) and torch.allclose(states[1], cache.ssm_state)


def test_layers_the_fused_step_refuses():
    from core.config import Mamba2Config
    from core.layers.mamba2 import Mamba2

    assert "biases" in Mamba2(16, Mamba2Config(d_state=8, headdim=8, bias=True)).fused_step_unsupported()
    assert "norm_before_gate" in Mamba2(16, Mamba2Config(d_state=8, headdim=8,
                                                         norm_before_gate=True)).fused_step_unsupported()
    assert "float64" in Mamba2(16, Mamba2Config(d_state=8, headdim=8)).double().fused_step_unsupported()


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_states_are_updated_in_float32_and_stored_rounded(state_dtype):
    check_sixteen_bit_state(mamba2_decode_block, OP, make(3, dtype=torch.bfloat16, seed=6), state_dtype)
