"""Compile the decoding-step kernels for a GPU target on a machine without one (used by test_pdl.py).

Run as a script in a process without TRITON_INTERPRET (so that ``triton.jit`` makes real JIT functions):

    TRITON_INTERPRET=0 python tests/kernels/hopper_compile.py --arch 90 --pdl 1

It calls each fused decode op once on small CPU tensors with the Triton launches replaced by recorders,
so the kernels' argument lists are exactly the ones the entry points build. Each recorded launch is then
compiled with Triton's own binder and compiler for ``cuda:<arch>`` (the wheel ships ptxas, so this
assembles real SASS; it checks inline PTX that the CPU interpreter never sees). Prints one JSON line per
kernel: its name, whether the PTX has the PDL instructions and L2 prefetches, whether they come before
the wait and the wait before every global store, which kernel arguments global loads before the wait
read from, and the cubin's size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, kernel: Any, calls: list) -> None:
        self.kernel, self.calls = kernel, calls

    label = ""  # appended to the kernel's name in the report (a second launch form of the same kernel)

    def __getitem__(self, grid: Any):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs, _Recorder.label))


def compile_launch(kernel: Any, args: tuple, kwargs: dict, target: Any) -> Any:
    """Compile one recorded launch as ``JITFunction.run`` would on ``target`` (Triton 3.6's binder)."""
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


_REG = re.compile(r"%[a-z]+[0-9]+")


def pre_wait_load_sources(ptx: str, param_names: list[str]) -> set[str]:
    """The kernel arguments that global loads before ``griddepcontrol.wait`` read from: a backward slice of
    each load's address register, through the PTX before the wait, to the ``ld.param`` of a pointer.
    ``param_names``: the kernel's non-constexpr arguments in order (the PTX params ``<kernel>_param_<i>``)."""
    if "griddepcontrol.wait" not in ptx:
        return set()
    origin: dict[str, set[str]] = {}
    sources: set[str] = set()
    for line in ptx.splitlines():
        text = line.strip()
        if "griddepcontrol.wait" in text:
            break
        if not text or text.startswith(("//", ".", "{", "}", "$")) or text.endswith(":"):
            continue
        text = re.sub(r"^@!?%p[0-9]+\s+", "", text).rstrip(";")
        opcode, _, operands = text.partition(" ")
        regs = _REG.findall(operands)
        if opcode.startswith("ld.param"):
            index = int(re.search(r"_param_([0-9]+)", operands).group(1))
            name = param_names[index] if index < len(param_names) else f"param_{index}"
            for reg in regs:
                origin[reg] = {name}
            continue
        if opcode.startswith("ld.global"):
            address = _REG.findall(operands.split("[", 1)[1])
            found = set().union(*(origin.get(r, set()) for r in address))
            sources |= found
            dests = _REG.findall(operands.split("[", 1)[0])
            for reg in dests:
                origin[reg] = found
            continue
        if not regs:
            continue
        dests = _REG.findall(operands.split("}", 1)[0]) if operands.startswith("{") else regs[:1]
        srcs = regs[len(dests):]
        derived = set().union(*(origin.get(r, set()) for r in srcs))
        for reg in dests:
            origin[reg] = derived
    return sources


def record_launches(pdl: bool) -> list:
    """The Triton launches of one fused Mamba-1 block step and one fused Mamba-2 block step, each with the
    whole-row kernels and then the chunked ones, and of the one-kernel logits (batch 1, bfloat16); then the
    large-batch step's split-K kernels and its scan step (batch 64): (kernel, args, kwargs, label)."""
    import torch

    from kernels import pdl as pdl_module
    from kernels.mamba_decode import triton as m1
    from kernels.mamba_decode import triton_logits as ml
    from kernels.mamba_decode import triton_mamba2 as m2

    calls: list = []
    for module in (m1, m2):
        module.pdl_enabled = lambda device: pdl  # the CPU tensors stand for a Hopper device's
        for name in ("_in_conv_kernel", "_scan_kernel", "_out_kernel"):
            setattr(module, name, _Recorder(getattr(module, name), calls))
    ml.pdl_enabled = lambda device: pdl
    ml._logits_kernel = _Recorder(ml._logits_kernel, calls)
    assert pdl_module.pdl_enabled(torch.device("cpu")) is False  # the real rule is untouched

    bf = dict(dtype=torch.bfloat16)
    dm, di, n, r, w = 64, 128, 16, 4, 4
    def mamba1_step():
        m1.mamba1_decode_block_op(
            torch.zeros(1, di, w - 1, **bf), torch.zeros(1, di, n), torch.zeros(1, dm, **bf), torch.zeros(1, dm, **bf),
            torch.ones(dm, **bf), 1e-5, torch.zeros(2 * di, dm, **bf), torch.zeros(di, w, **bf),
            torch.zeros(di, **bf), torch.zeros(r + 2 * n, di, **bf), torch.zeros(di, r, **bf), torch.zeros(di, **bf),
            -torch.ones(di, n), torch.ones(di), torch.zeros(dm, di, **bf), torch.float32, None)

    mamba1_step()  # whole-row kernels: weights and states loaded before the wait
    tiles = m1.TILES
    m1.TILES = {**tiles, "small": {**tiles["small"], "pre": False}}  # chunked kernels: L2 prefetches only
    _Recorder.label = ":chunked"
    try:
        mamba1_step()
    finally:
        m1.TILES, _Recorder.label = tiles, ""
    ml.decode_logits_op(None, torch.zeros(1, dm), torch.ones(dm, **bf), 1e-5, torch.zeros(100, dm, **bf), 97,
                        torch.float32)
    heads, headdim, groups = 4, 32, 1
    conv_dim = di + 2 * groups * n
    def mamba2_step():
        m2.mamba2_decode_block_op(
            torch.zeros(1, conv_dim, w - 1, **bf), torch.zeros(1, heads, headdim, n), torch.zeros(1, dm, **bf),
            torch.zeros(1, dm, **bf), torch.ones(dm, **bf), 1e-5, torch.zeros(di + conv_dim + heads, dm, **bf),
            torch.zeros(conv_dim, w, **bf), torch.zeros(conv_dim, **bf), torch.zeros(heads), -torch.ones(heads),
            torch.ones(heads), 0.0, float("inf"), torch.ones(di, **bf), 1e-5, torch.zeros(dm, di, **bf),
            torch.float32, None)

    mamba2_step()
    tiles2 = m2.TILES
    m2.TILES = {**tiles2, "small": {**tiles2["small"], "pre": False}}
    _Recorder.label = ":chunked"
    try:
        mamba2_step()
    finally:
        m2.TILES, _Recorder.label = tiles2, ""

    # The large-batch step's split-K kernels (batch 64), and the scan step on x_proj's partials.
    from kernels.mamba_decode import triton_splitk as ms

    ms.pdl_enabled = lambda device: pdl
    for name in ("_partials_kernel", "_add_norm_kernel", "_conv_kernel"):
        setattr(ms, name, _Recorder(getattr(ms, name), calls))
    ms.linear_partials_op(torch.zeros(64, di, **bf), torch.zeros(r + 2 * n, di, **bf), 2)
    ms.add_norm_partials_op(torch.zeros(2, 64, dm), torch.zeros(64, dm), torch.ones(dm, **bf), 1e-5, torch.bfloat16,
                            torch.float32)
    ms.conv_step_partials_op(torch.zeros(2, 64, 2 * di), torch.zeros(64, di, w - 1, **bf), torch.zeros(di, w, **bf),
                             torch.zeros(di, **bf), torch.bfloat16)
    _Recorder.label = ":step"
    try:
        m1.mamba1_scan_step_op(torch.zeros(64, di, n), torch.zeros(64, di, **bf), torch.zeros(64, di, **bf),
                               torch.zeros(2, 64, r + 2 * n), torch.zeros(di, r, **bf), torch.zeros(di),
                               -torch.ones(di, n), torch.ones(di))
    finally:
        _Recorder.label = ""

    # The large-batch step's LM head and greedy pick (batch 64).
    from kernels.mamba_decode import triton_head as mh

    mh.pdl_enabled = lambda device: pdl
    for name in ("_head_kernel", "_pick_kernel"):
        setattr(mh, name, _Recorder(getattr(mh, name), calls))
    _, pkey, pidx = mh.lm_head_logits_op(torch.zeros(64, dm, **bf), torch.zeros(1000, dm, **bf), 997, True)
    mh.greedy_pick_op(pkey, pidx, torch.zeros(64, dtype=torch.long))
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100)")
    parser.add_argument("--pdl", type=int, default=1, help="1: the kernels as launched with PDL on")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter makes no compilable kernels")
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", args.arch, 32)
    for kernel, kargs, kwargs, label in record_launches(bool(args.pdl)):
        compiled = compile_launch(kernel, kargs, kwargs, target)
        ptx = compiled.asm["ptx"]
        params = {k: v for k, v in compiled.src.signature.items() if v != "constexpr"}  # the PTX params, in order
        lines = ptx.splitlines()
        first = lambda pattern: next((i for i, line in enumerate(lines) if pattern in line), len(lines))
        last = lambda pattern: max((i for i, line in enumerate(lines) if pattern in line), default=-1)
        print(json.dumps({
            "kernel": f"{kernel.fn.__module__.rsplit('.', 1)[-1]}.{kernel.fn.__name__}{label}",
            "launch_pdl": bool(kwargs.get("launch_pdl", False)),
            "gdc_wait": "griddepcontrol.wait" in ptx,
            "gdc_launch_dependents": "griddepcontrol.launch_dependents" in ptx,
            "prefetches": ptx.count("prefetch.global.L2"),
            # every prefetch before the wait, and no global load or store before it
            "ordered": last("prefetch.global.L2") < first("griddepcontrol.wait") < first("st.global"),
            # what is loaded before the wait (must not be what the previous kernel writes)
            "pre_wait_loads": sorted(name for name in pre_wait_load_sources(ptx, list(params))
                                     if params[name][0] == "*"),
            "cubin_bytes": len(compiled.asm["cubin"]),
        }), flush=True)


if __name__ == "__main__":
    main()
