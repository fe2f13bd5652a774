"""Programmatic dependent launch (PDL) for the decoding-step kernels, with L2 prefetches of their weights.

A batch-1 decoding step of a 130M model is a chain of ~77 small dependent kernels (docs/generation.md).
Each waits for the previous one to finish before it even starts, and then spends most of its time on
memory round trips for weights that never depended on the previous kernel. On Hopper and later, a kernel
launched with PDL (``launch_pdl=True``, Triton's CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION) may
start while its predecessor still runs; the two are ordered only at ``griddepcontrol.wait``, which
blocks until the predecessor has completed and its writes are visible. The kernels here use that window:

    prefetch_l2(<weight and state lines>)     # hints only: no value read before the wait is used
    wait_for_prior_kernel(PDL)                # griddepcontrol.wait, then launch_dependents
    <the unchanged kernel body>

Correctness therefore does not depend on what was prefetched: every store of the body comes after the
wait. So does every load of data that the previous kernel writes. Each kernel releases its successor only
after its own wait, so when a kernel starts, the kernel before its predecessor has completed and its
writes are visible. A load before the wait may therefore read the weights (never written) and anything
last written two or more kernels back; the whole-row Mamba-1 kernels load their weights and their layer's
states that way (``kernels/mamba_decode/triton.py``). ``tests/kernels/test_pdl.py`` checks in the
compiled PTX which kernel arguments each load before the wait comes from. ``prefetch.global.L2``
brings a 128-byte line into L2, which every SM shares and which is the point of coherence, so a line
fetched early cannot be stale for a load issued after the wait. The body's weight loads then hit L2
instead of HBM; CUDA graphs keep the programmatic edges (CUDA 12.3+).

PDL is used on CUDA devices of compute capability >= 9.0 unless ``SSM_SUITE_PDL=0``; elsewhere (older
GPUs, the CPU interpreter) ``PDL`` is False and the helpers compile to nothing.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

LINE_BYTES = 128  # an L2 line as prefetch.global.L2 fetches it


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` use programmatic dependent launch (see the module doc)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("SSM_SUITE_PDL", "1") == "0":
        return False
    return _capability_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


def line_elems(t: torch.Tensor) -> int:
    """Elements of ``t``'s dtype in one L2 line: the spacing of :func:`prefetch_l2`'s pointers along a row."""
    return max(1, LINE_BYTES // t.element_size())


@triton.jit
def prefetch_l2(ptrs, mask, base, PDL: tl.constexpr):
    """Hint: bring the lines at ``ptrs`` (where ``mask``) into L2. Masked-off entries prefetch ``base``, a
    valid address, so no lane touches memory outside the tensors. Nothing is returned or read."""
    if PDL:
        safe = tl.where(mask, ptrs, base)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [safe],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_rows_l2(base, rows, row_mask, stride_row, row_len, LINE: tl.constexpr, LP: tl.constexpr,
                     PDL: tl.constexpr):
    """Prefetch the contiguous rows ``base + rows * stride_row + [0, row_len)`` (unit stride along a row),
    one pointer per line: ``LINE`` elements a line, ``LP`` >= ceil(row_len / LINE) lines a row (a power
    of two)."""
    if PDL:
        offs = tl.arange(0, LP) * LINE
        ptrs = base + rows[:, None].to(tl.int64) * stride_row + offs[None, :]
        prefetch_l2(ptrs, row_mask[:, None] & (offs[None, :] < row_len), base, PDL)


@triton.jit
def wait_for_prior_kernel(PDL: tl.constexpr):
    """Block until the previous kernel in the stream has completed and its writes are visible, then let
    the next PDL kernel start (its prologue overlaps this kernel's body). No-op without PDL."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def lines_pow2(row_len: int, line: int) -> int:
    """LP for :func:`prefetch_rows_l2`: lines per row rounded up to a power of two."""
    n = max(1, -(-int(row_len) // int(line)))
    return 1 << (n - 1).bit_length()
