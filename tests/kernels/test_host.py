"""kernels/host.py's launch helpers equal Triton's own (which cost ~6 us a host call in Triton 3.6)."""

from __future__ import annotations

import pytest

from kernels.host import cdiv, next_power_of_2

triton = pytest.importorskip("triton")


def test_cdiv_matches_triton():
    for a in range(0, 300):
        for b in (1, 2, 3, 7, 16, 64, 128, 255):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    assert cdiv(2**40 + 1, 2**20) == triton.cdiv(2**40 + 1, 2**20) == 2**20 + 1


def test_next_power_of_2_matches_triton():
    for n in list(range(0, 1100)) + [2**31 - 1, 2**31, 2**31 + 1, 3 * 2**40]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
