"""Integer helpers for the host side of kernel launches (grid sizes, tile sizes).

Triton 3.6 defines ``triton.cdiv`` and ``triton.next_power_of_2`` as constexpr functions: called from host
code, each call wraps and unwraps its arguments as constexprs, about 6 us on a server CPU, and a
selective-scan launch computed eight of them (a third of its wrapper's host time). At batch 1 a prefill
is host-bound (docs/benchmarks.md), so launches use these plain-Python equivalents instead. Kernel bodies
keep ``tl.cdiv``.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, as ``triton.cdiv``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
