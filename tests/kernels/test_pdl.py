"""Programmatic dependent launch in the fused decode kernels (kernels/pdl.py).

The CPU interpreter cannot run ``griddepcontrol`` or ``prefetch.global.L2``, so these tests compile the
kernels, as the entry points launch them, for an H100 (sm_90) with the ptxas that the Triton wheel ships:
the inline PTX must assemble, the PDL instructions must be there, and every L2 prefetch must precede the
wait and the wait every global load and store (what makes PDL correct). For sm_80 (no PDL) none of it may
appear. Whether PDL pays off is measured on the GPU (scripts/gpu_checks/mamba_decode.py)."""

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
KERNELS = {f"{m}.{k}" for m in ("triton", "triton_mamba2") for k in ("_in_conv_kernel", "_scan_kernel", "_out_kernel")}


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
        assert row["prefetches"] > 0, name
        assert row["ordered"], f"{name}: a global load or store comes before griddepcontrol.wait"
        assert row["cubin_bytes"] > 0


def test_without_pdl_the_kernels_have_none_of_it():
    rows = compile_kernels(80, False)
    assert set(rows) == KERNELS
    for name, row in rows.items():
        assert not (row["launch_pdl"] or row["gdc_wait"] or row["gdc_launch_dependents"] or row["prefetches"]), name


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
