"""Out-of-bounds and uninitialized-memory checks for Triton kernels run by the CPU interpreter
(TRITON_INTERPRET=1).

On a GPU a stray address is an "illegal memory access" reported at some later CUDA call, with no kernel,
program or address named (errors are sticky and asynchronous); the interpreter reads and writes host
memory instead, where a stray address silently reads a neighbour's bytes (or corrupts them). These helpers
make such accesses errors at the access itself:

``bounds_checked()``
    A context manager. While active, every interpreted kernel launch records the memory of the tensors
    passed to it (each argument's view extent, or its whole storage with ``views=False``), and every
    load, store and atomic the kernel issues (plain, masked, block-pointer and tensor-descriptor ones:
    the interpreter lowers them all to ``create_masked_load`` / ``create_masked_store``) checks that each
    address whose mask is true, together with the element's bytes, lies inside one of them. Otherwise it
    raises :class:`OutOfBounds`, naming the kernel, the program id, the access, the first bad address
    and the nearest argument (its name, shape, dtype and where the address falls relative to it). The
    checker object lists the launches it saw (``.launches``), so a test can assert that the kernels it
    meant to check did run under it.

``poisoned_empty()``
    A context manager under which ``torch.empty`` / ``empty_like`` / ``Tensor.new_empty`` fill floating
    tensors with NaN and integer ones with a large sentinel, so a kernel that reads memory nobody wrote
    (harmless-looking on CPU, where fresh allocations are often zero) shows up as NaN in its results.

Both need the interpreter; nothing here touches a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Iterator

import numpy as np
import torch

__all__ = ["OutOfBounds", "BoundsChecker", "bounds_checked", "poisoned_empty"]


class OutOfBounds(AssertionError):
    """A kernel addressed memory outside every tensor passed to its launch."""


@dataclasses.dataclass(frozen=True)
class Region:
    """Bytes [start, end) of one tensor argument (its view's extent, or its storage)."""

    name: str
    start: int
    end: int
    shape: tuple
    dtype: torch.dtype

    def describe(self, addr: int) -> str:
        itemsize = max(1, torch.empty((), dtype=self.dtype).element_size())
        where = (f"{(addr - self.end)} bytes past its end" if addr >= self.end else
                 f"{(self.start - addr)} bytes before its start" if addr < self.start else
                 f"at element {(addr - self.start) // itemsize}")
        return (f"'{self.name}' {list(self.shape)} {str(self.dtype).replace('torch.', '')} "
                f"[{self.start:#x}, {self.end:#x}), {where}")


def _regions(name: str, value, views: bool) -> list[Region]:
    """The memory one launch argument gives the kernel (tensors, tuples of them, descriptors' bases)."""
    if isinstance(value, (tuple, list)):
        return [r for k, v in enumerate(value) for r in _regions(f"{name}[{k}]", v, views)]
    base = getattr(value, "base", None)  # a TensorDescriptor / TensorWrapper: its tensor
    if not isinstance(value, torch.Tensor) and isinstance(base, torch.Tensor):
        return _regions(name, base, views)
    if not isinstance(value, torch.Tensor):
        return []
    if views:
        if value.numel() == 0:
            return []
        span = 1 + sum((s - 1) * st for s, st in zip(value.shape, value.stride()))
        start = value.data_ptr()
        end = start + span * value.element_size()
    else:
        storage = value.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    return [Region(name, start, end, tuple(value.shape), value.dtype)]


class BoundsChecker:
    """State of one ``bounds_checked()`` block: the launch being run and the launches seen."""

    def __init__(self, views: bool):
        self.views = views
        self.launches: list[str] = []  # kernel names, in launch order
        self.accesses = 0  # memory operations checked
        self._stack: list[tuple[str, list[Region], np.ndarray, np.ndarray]] = []

    # -- launches -----------------------------------------------------------------------------------
    def enter_launch(self, kernel: str, named_args: dict) -> None:
        regions = [r for k, v in named_args.items() for r in _regions(k, v, self.views)]
        # The union of the regions (arguments may alias: a dummy pointer is often another argument),
        # sorted and merged, so one binary search finds the interval an address could lie in.
        spans = sorted((r.start, r.end) for r in regions)
        merged: list[list[int]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        starts = np.array([m[0] for m in merged], dtype=np.uint64)
        ends = np.array([m[1] for m in merged], dtype=np.uint64)
        self._stack.append((kernel, regions, starts, ends))
        self.launches.append(kernel)

    def exit_launch(self) -> None:
        self._stack.pop()

    # -- accesses -----------------------------------------------------------------------------------
    def check(self, op: str, ptrs, mask, program) -> None:
        """Raise :class:`OutOfBounds` if a pointer of ``ptrs`` (a TensorHandle of addresses) whose
        ``mask`` is true, with its element's bytes, is not inside one launch argument."""
        if not self._stack:
            return  # a kernel launched before the block began, or not through the interpreter's grid
        kernel, regions, starts, ends = self._stack[-1]
        self.accesses += 1
        addr = np.asarray(ptrs.data, dtype=np.uint64)
        on = np.ones(addr.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask.data, bool), addr.shape)
        live = addr[on]
        if live.size == 0:
            return
        itemsize = np.uint64(max(1, ptrs.get_element_ty().primitive_bitwidth // 8))
        idx = np.searchsorted(starts, live, side="right").astype(np.int64) - 1
        ok = idx >= 0
        ok[ok] = live[ok] + itemsize <= ends[idx[ok]]
        if ok.all():
            return
        bad = live[~ok]
        first = int(bad[0])
        lane = tuple(int(i) for i in np.argwhere(on & (addr == bad[0]))[0]) if addr.ndim else ()
        nearest = min(regions, key=lambda r: min(abs(first - r.start), abs(first - (r.end - 1)))) if regions else None
        raise OutOfBounds(
            f"{kernel}: {op} of {int(bad.size)} element(s) outside every tensor argument, program id "
            f"{program}, first at lane {lane} address {first:#x} ({itemsize} bytes); nearest argument: "
            + (nearest.describe(first) if nearest is not None else "none (the launch has no tensors)"))


_active = threading.local()


def _checker() -> BoundsChecker | None:
    return getattr(_active, "checker", None)


@contextlib.contextmanager
def bounds_checked(views: bool = True) -> Iterator[BoundsChecker]:
    """Check every memory access of the Triton kernels interpreted inside the block (see the module
    docstring). ``views=True`` bounds each argument by its view's extent (stricter: a kernel may not
    read past a slice into the rest of its buffer); ``views=False`` by its whole storage."""
    from triton.runtime import interpreter as interp

    if not hasattr(interp, "GridExecutor"):
        raise RuntimeError("bounds_checked needs Triton's interpreter (triton.runtime.interpreter)")
    if _checker() is not None:
        raise RuntimeError("bounds_checked blocks do not nest")
    checker = BoundsChecker(views)
    Builder, Executor = interp.InterpreterBuilder, interp.GridExecutor
    saved = {name: getattr(Builder, name) for name in
             ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}
    saved_init, saved_call = Executor._init_args_hst, Executor.__call__

    def program(builder) -> tuple:
        return tuple(builder.grid_idx) if builder.grid_idx is not None else ()

    def masked_load(self, ptrs, mask, other, *args, **kwargs):
        checker.check("load", ptrs, mask, program(self))
        return saved["create_masked_load"](self, ptrs, mask, other, *args, **kwargs)

    def masked_store(self, ptrs, value, mask, *args, **kwargs):
        checker.check("store", ptrs, mask, program(self))
        return saved["create_masked_store"](self, ptrs, value, mask, *args, **kwargs)

    def atomic_rmw(self, rmw_op, ptr, val, mask, *args, **kwargs):
        checker.check("atomic_rmw", ptr, mask, program(self))
        return saved["create_atomic_rmw"](self, rmw_op, ptr, val, mask, *args, **kwargs)

    def atomic_cas(self, ptr, cmp, val, *args, **kwargs):
        checker.check("atomic_cas", ptr, None, program(self))
        return saved["create_atomic_cas"](self, ptr, cmp, val, *args, **kwargs)

    def init_args(self, args_dev, kwargs):
        # The host copies are what the kernel's pointers point into (on a CPU tensor, the tensor itself).
        args_hst, kwargs_hst = saved_init(self, args_dev, kwargs)
        named = dict(zip(self.arg_names, args_hst))
        named.update(kwargs_hst)
        checker.enter_launch(getattr(self.fn, "__name__", "kernel"), named)
        return args_hst, kwargs_hst

    def call(self, *args, **kwargs):
        depth = len(checker._stack)
        try:
            return saved_call(self, *args, **kwargs)
        except interp.InterpreterError as err:
            # The grid loop wraps kernel errors; hand ours back as itself.
            if isinstance(err.__cause__, OutOfBounds):
                raise err.__cause__ from None
            raise
        finally:
            del checker._stack[depth:]

    Builder.create_masked_load, Builder.create_masked_store = masked_load, masked_store
    Builder.create_atomic_rmw, Builder.create_atomic_cas = atomic_rmw, atomic_cas
    Executor._init_args_hst, Executor.__call__ = init_args, call
    _active.checker = checker
    try:
        yield checker
    finally:
        for name, fn in saved.items():
            setattr(Builder, name, fn)
        Executor._init_args_hst, Executor.__call__ = saved_init, saved_call
        _active.checker = None


@contextlib.contextmanager
def poisoned_empty() -> Iterator[None]:
    """Within the block, uninitialized allocations (``torch.empty``, ``torch.empty_like``,
    ``Tensor.new_empty``) come back filled with NaN (floating dtypes) or 2^30 - 1 (integer dtypes), so a
    result that depends on memory nobody wrote is NaN or visibly wrong rather than accidentally zero."""
    saved = (torch.empty, torch.empty_like, torch.Tensor.new_empty)

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.numel():
            with torch.no_grad():
                if t.is_floating_point() or t.is_complex():
                    t.fill_(float("nan"))
                elif t.dtype != torch.bool:
                    t.fill_(2**30 - 1 if t.dtype not in (torch.int8, torch.uint8, torch.int16) else 99)
        return t

    def empty(*args, **kwargs):
        return poison(saved[0](*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison(saved[1](*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return poison(saved[2](self, *args, **kwargs))

    torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = saved
