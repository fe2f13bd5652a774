"""What the decoding-kernel tests share: the Triton module under test or a skip of the whole test
module (:func:`triton_kernels`), seeded random inputs, and for the Mamba-1 and Mamba-2 fused block steps
the three forms of the residual stream, fresh copies of the arguments (states are updated in place), the
block's own output, and a run of the public op on a forced backend. The tests import it from beside them
(pytest runs with --import-mode=importlib: no sys.path entry for the tests folder)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from kernels.dispatch import forced_backend

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def triton_kernels(module: str) -> ModuleType:
    """The Triton kernels ``module`` (e.g. "kernels.mamba_decode.triton_head"), imported; or a skip of the
    calling test module without triton, where the kernels cannot load, or with neither the interpreter
    (TRITON_INTERPRET=1, the tests' default: tests/conftest.py) nor a GPU."""
    pytest.importorskip("triton")
    try:
        kernels = importlib.import_module(module)
    except ImportError as error:  # pragma: no cover - triton present but unusable here
        pytest.skip(f"triton kernels cannot load: {error}", allow_module_level=True)
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)
    return kernels


def rnd(*shape, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard-normal values drawn in float64 from a seeded CPU generator, on DEVICE in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def with_stream(args: dict, stream: str) -> dict:
    """The block's arguments for one form of the stream, on DEVICE: "x+res" (x added to the residual),
    "x" (the first block: no residual yet) or "res+ssq" (the previous block was fused: its output is in
    the residual already, with its partial sums of squares)."""
    if stream == "x":
        args["residual"] = None
    elif stream == "res+ssq":
        args["x"] = None
        sq = args["residual"].double().square().sum(-1)
        args["residual_sumsq"] = torch.stack([0.5 * sq, 0.25 * sq, 0.25 * sq]).float()  # 3 partial sums
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def copy(args: dict, dtype: torch.dtype | None = None) -> dict:
    """Fresh copies (the states are updated in place), optionally every float tensor in ``dtype``."""
    out = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v.clone()
        else:
            out[k] = v
    if dtype is not None:
        out["residual_dtype"] = dtype
    return out


def stream_in(args: dict) -> torch.Tensor:
    x, res = args["x"], args["residual"]
    if x is None:
        return res.double()
    return x.double() if res is None else x.double() + res.double()


def run_block(op: Callable, op_name: str, backend: str, args: dict) -> tuple[dict, torch.Tensor]:
    """(outputs: the block's own output `delta` = residual_out - stream, the row sums of squares, the
    updated states; and residual_out) of ``op`` on ``backend``."""
    args = copy(args)
    with forced_backend(backend, op_name):
        res_out, sumsq = op(**args)
    outs = {"delta": res_out.double() - stream_in(args), "sumsq": sumsq.double().sum(0),
            "conv_state": args["conv_state"], "ssm_state": args["ssm_state"]}
    return outs, res_out


def check_sixteen_bit_state(op: Callable, op_name: str, args: dict, state_dtype: torch.dtype) -> None:
    """A block step with its state in 16 bits (generate(ssm_state_dtype=...), as mamba_ssm keeps it): the
    Triton kernels load it, update it in float32 and store it rounded, as the reference steps do."""
    args = {**args, "ssm_state": args["ssm_state"].to(state_dtype)}
    ours, _ = run_block(op, op_name, "triton", args)
    ref, _ = run_block(op, op_name, "reference", args)
    assert ours["ssm_state"].dtype == state_dtype
    for key in ref:
        assert rel(ours[key], ref[key]) < 2e-2, key
    assert rel(ours["ssm_state"], args["ssm_state"]) > 1e-2  # the state moved
