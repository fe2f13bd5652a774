"""Programmatic dependent launch in the fused decode kernels (kernels/pdl.py).

The CPU interpreter cannot run ``griddepcontrol`` or ``prefetch.global.L2``, so these tests compile the
kernels, as the entry points launch them, for an H100 (sm_90) with the ptxas that the Triton wheel ships:
the inline PTX must assemble, the PDL instructions must be there, every L2 prefetch must precede the wait
and the wait every global store, and a global load before the wait may read only what the previous kernel
does not write (a backward slice of each load's address to the kernel argument it comes from): what
makes PDL correct. For sm_80 (no PDL) none of it may appear. Whether PDL pays off is measured on the GPU
(scripts/gpu_checks/mamba_decode.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import pdl

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parent / "hopper_compile.py"
KERNELS = {f"{m}.{k}{v}" for m in ("triton", "triton_mamba2")
           for k in ("_in_conv_kernel", "_scan_kernel", "_out_kernel") for v in ("", ":chunked")}
KERNELS |= {"triton_logits._logits_kernel", "triton._scan_kernel:step", "triton_splitk._partials_kernel",
            "triton_splitk._add_norm_kernel", "triton_splitk._conv_kernel", "triton_head._head_kernel",
            "triton_head._pick_kernel"}
# Kernels that only prefetch before the wait (the others load their weights or states there), and those
# that do nothing before it (all they read is the previous kernel's output).
PREFETCH_ONLY = {name for name in KERNELS if ":" in name} | {"triton_splitk._partials_kernel",
                                                             "triton_head._head_kernel"}
WAIT_FIRST = {"triton_head._pick_kernel"}
# What each kernel may load before griddepcontrol.wait: never what the previous kernel writes (kernel 1 <-
# the previous block's kernel 3: stream, sums of squares; kernel 2 <- kernel 1: x_proj partials, conv
# output, z; kernel 3 <- kernel 2: y). Weights never change; a layer's states were last written by the
# same kernel one token earlier, and kernel 3's residual by kernel 1 or the previous block's kernel 3,
# which all finished before the previous kernel passed its own wait (kernels/pdl.py).
# Mamba-2: kernel 2 <- kernel 1's z | xBC | dt buffer; kernel 3 <- kernel 2's y and norm partials.
PRE_WAIT_ALLOWED = {
    "triton._in_conv_kernel": {"nw_ptr", "win_ptr", "cw_ptr", "cb_ptr", "cs_ptr", "wx_ptr"},
    "triton._scan_kernel": {"wdt_ptr", "dtb_ptr", "A_ptr", "D_ptr", "st_ptr"},
    "triton._out_kernel": {"wo_ptr", "res_in_ptr"},
    "triton_mamba2._in_conv_kernel": {"nw_ptr", "win_ptr", "cw_ptr", "cb_ptr", "cs_ptr"},
    "triton_mamba2._scan_kernel": {"dtb_ptr", "A_ptr", "D_ptr", "st_ptr"},
    "triton_mamba2._out_kernel": {"wo_ptr", "gw_ptr", "res_in_ptr"},
    "triton_logits._logits_kernel": {"nw_ptr", "w_ptr"},
    # The split-K step: the x_proj / out_proj / in_proj partials <- the conv / scan / norm kernel; the norm's
    # stream <- out_proj's partials; the conv kernel <- in_proj's partials (its window: its own, a token back).
    "triton_splitk._partials_kernel": {"w_ptr"},
    "triton_splitk._add_norm_kernel": {"nw_ptr"},
    "triton_splitk._conv_kernel": {"state_ptr", "w_ptr", "b_ptr"},
    # The LM head <- the final norm's hidden rows; the greedy pick <- the LM head's partials.
    "triton_head._head_kernel": {"w_ptr"},
    "triton_head._pick_kernel": set(),
}


def compile_kernels(arch: int, use_pdl: bool) -> dict[str, dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--arch", str(arch), "--pdl", str(int(use_pdl))],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {row["kernel"]: row for row in rows}


def test_hopper_kernels_wait_before_any_access_and_prefetch_their_weights():
    rows = compile_kernels(90, True)
    assert set(rows) == KERNELS
    for name, row in rows.items():
        assert row["launch_pdl"] and row["gdc_wait"] and row["gdc_launch_dependents"], name
        assert row["ordered"], f"{name}: a prefetch after, or a global store before, griddepcontrol.wait"
        base = name.split(":")[0]
        early = set(row["pre_wait_loads"])
        assert early <= PRE_WAIT_ALLOWED[base], f"{name} reads {early - PRE_WAIT_ALLOWED[base]} before the wait"
        if name in WAIT_FIRST:
            assert not early and row["prefetches"] == 0, name
        elif name not in PREFETCH_ONLY:  # the whole-row kernels load their weights or state early
            assert {"win_ptr", "wdt_ptr", "wo_ptr", "w_ptr", "st_ptr", "nw_ptr", "state_ptr"} & early, name
        else:
            assert row["prefetches"] > 0 and not early, name
        assert row["cubin_bytes"] > 0


def test_without_pdl_the_kernels_have_none_of_it():
    rows = compile_kernels(80, False)
    assert set(rows) == KERNELS
    for name, row in rows.items():
        assert not (row["launch_pdl"] or row["gdc_wait"] or row["gdc_launch_dependents"] or row["prefetches"]), name
        assert not row["pre_wait_loads"], name  # no wait: nothing counts as before it


def test_pdl_enabled_rule(monkeypatch):
    monkeypatch.delenv("SSM_SUITE_PDL", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(pdl, "_capability_major", lambda index: 9)
    assert pdl.pdl_enabled(cuda)
    assert not pdl.pdl_enabled(torch.device("cpu"))
    monkeypatch.setenv("SSM_SUITE_PDL", "0")
    assert not pdl.pdl_enabled(cuda)
    monkeypatch.setenv("SSM_SUITE_PDL", "1")
    monkeypatch.setattr(pdl, "_capability_major", lambda index: 8)  # A100: no griddepcontrol
    assert not pdl.pdl_enabled(cuda)
    monkeypatch.setattr(pdl, "_capability_major", lambda index: 9)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.pdl_enabled(cuda)


def test_line_helpers():
    assert pdl.line_elems(torch.zeros(1, dtype=torch.bfloat16)) == 64
    assert pdl.line_elems(torch.zeros(1, dtype=torch.float32)) == 32
    assert [pdl.lines_pow2(n, 64) for n in (1, 64, 65, 768, 1536)] == [1, 1, 2, 16, 32]
