"""The one place that decides which backend runs an op.

Each op package (``kernels/<op>/__init__.py``) exposes one public function. That function asks
:func:`choose_backend` which of its implementations to run:

- ``reference``: the plain sequential form that defines the semantics (runs in float64 too);
- ``chunked``: a PyTorch chunked form, fast on CPU, differentiable through autograd;
- ``triton``: the GPU kernels.

The default is ``triton`` on CUDA where an op has it, else ``chunked`` where the op has it, else
``reference``. Tests and benchmarks force a backend with an environment variable, either for all ops
(``SSM_SUITE_BACKEND=reference``) or for one (``SSM_SUITE_BACKEND_SELECTIVE_SCAN=chunked``), or with the
:func:`forced_backend` context manager.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

BACKENDS = ("reference", "chunked", "triton")

_local = threading.local()


def _env_key(op: str) -> str:
    return "SSM_SUITE_BACKEND_" + op.upper()


def _forced(op: str) -> tuple[str | None, bool]:
    """The forced backend for ``op`` and whether it was forced for this op alone (strict)."""
    stack = getattr(_local, "stack", [])
    for forced_op, backend in reversed(stack):
        if forced_op in (op, "*"):
            return backend, forced_op == op
    if os.environ.get(_env_key(op)):
        return os.environ[_env_key(op)], True
    return os.environ.get("SSM_SUITE_BACKEND") or None, False


@contextlib.contextmanager
def forced_backend(backend: str, op: str = "*") -> Iterator[None]:
    """Run the body with ``op`` (or every op, ``"*"``) on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append((op, backend))
    try:
        yield
    finally:
        stack.pop()


def choose_backend(op: str, available: tuple[str, ...], device: torch.device) -> str:
    """Pick the backend for ``op`` among ``available`` for tensors on ``device``.

    A forced backend that the op lacks, or ``triton`` forced for CPU tensors without
    ``TRITON_INTERPRET=1``, is an error rather than a silent fallback: a benchmark or test that asks
    for a backend must get it.
    """
    forced, strict = _forced(op)
    if forced is None:
        if device.type == "cuda" and "triton" in available:
            return "triton"
        return "chunked" if "chunked" in available else "reference"
    if forced not in BACKENDS:
        raise ValueError(f"{_env_key(op)} / SSM_SUITE_BACKEND is {forced!r}; choose one of {BACKENDS}")
    if forced not in available:
        if strict:
            raise ValueError(f"op {op!r} has no {forced!r} backend (it has {available})")
        # Forced for all ops: an op without that form runs its next simpler one.
        order = BACKENDS[: BACKENDS.index(forced)][::-1]
        forced = next(b for b in order if b in available)
    if forced == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"op {op!r}: the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 on CPU")
    return forced
