"""The one-kernel end of a decoding step (kernels/mamba_decode/triton_logits.py: final residual add +
RMSNorm + LM head + float32 logits; Triton on CPU through TRITON_INTERPRET=1) against its op-by-op
reference: the three forms of the stream, float32 and bfloat16 (equal roundings: only the order of the
additions differs), a vocabulary smaller than the LM head's padded rows, odd widths, the batch limit,
torch.library checks and errors. The H100 run: scripts/gpu_checks/mamba_decode.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kernels.dispatch import forced_backend
from kernels.mamba_decode import decode_logits

# The shared helpers beside this file (pytest imports tests with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_block import DEVICE, triton_kernels  # noqa: E402

triton_logits = triton_kernels("kernels.mamba_decode.triton_logits")


def make(batch, d_model=48, vocab=83, padded=96, dtype=torch.float32, stream="x+res", seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    args = dict(x=rnd(batch, d_model).to(dtype), residual=(3 * rnd(batch, d_model)).float(),
                norm_weight=(1 + 0.2 * rnd(d_model)).to(dtype), norm_eps=1e-5,
                lm_head_weight=(rnd(padded, d_model) / d_model**0.5).to(dtype), vocab_size=vocab,
                residual_dtype=torch.float32)
    if stream == "x":
        args["residual"] = None
        args["residual_dtype"] = dtype
    elif stream == "res":
        args["x"] = None
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def run(backend, args):
    with forced_backend(backend, "decode_logits"):
        return decode_logits(**args)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("stream", ["x+res", "x", "res"])
@pytest.mark.parametrize("batch", [1, 3])
def test_float32_matches_reference(batch, stream):
    args = make(batch, stream=stream, seed=batch)
    ours, ref = run("triton", args), run("reference", args)
    assert ours.dtype == torch.float32 and ours.shape == (batch, 83)
    assert rel(ours, ref) < 1e-6


@pytest.mark.parametrize("stream", ["x+res", "res"])
def test_bfloat16_rounds_like_the_op_by_op_step(stream):
    args = make(2, dtype=torch.bfloat16, stream=stream, seed=5)
    ours, ref = run("triton", args), run("reference", args)
    truth = run("reference", {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
                | {"residual_dtype": torch.float64})
    assert rel(ours, ref) < 1e-2  # the same roundings; a logit may sit one bf16 step away
    assert rel(ours, truth) < 3 * rel(ref, truth) + 1e-4
    # every logit is a bfloat16 value (rounded as F.linear rounds), stored as float32
    assert torch.equal(ours, ours.bfloat16().float())


def test_odd_width_and_whole_vocabulary():
    args = make(1, d_model=37, vocab=50, padded=50, seed=7)
    assert rel(run("triton", args), run("reference", args)) < 1e-6


def test_tiles_and_limits():
    assert triton_logits.tiles(1, 768) == {"BB": 1, "BV": 8, "BK": 1024}
    assert triton_logits.tiles(3, 768)["BB"] == 4
    assert triton_logits.unsupported(4, 768, torch.bfloat16) is None
    assert "batch" in triton_logits.unsupported(5, 768, torch.bfloat16)
    assert "d_model" in triton_logits.unsupported(1, 10000, torch.bfloat16)
    with forced_backend("triton", "decode_logits"), pytest.raises(ValueError, match="reference backend"):
        decode_logits(**make(5))


def test_library_op_checks():
    args = make(2, seed=9)
    op_args = (args["x"], args["residual"], args["norm_weight"], 1e-5, args["lm_head_weight"], 83, torch.float32)
    torch.library.opcheck(triton_logits.decode_logits_op, op_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_errors():
    args = make(2)
    with pytest.raises(ValueError, match="give x"):
        decode_logits(**{**args, "x": None, "residual": None})
    with pytest.raises(ValueError, match="vocab_size"):
        decode_logits(**{**args, "vocab_size": 97})
    with pytest.raises(ValueError, match="lm_head_weight"):
        decode_logits(**{**args, "lm_head_weight": args["lm_head_weight"][:, :-1]})
