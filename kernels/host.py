"""Host-side helpers of the kernels' entry points: integer arithmetic for launches, and a lighter
autograd path for custom ops.

Triton 3.6 defines ``triton.cdiv`` and ``triton.next_power_of_2`` as constexpr functions: called from host
code, each call wraps and unwraps its arguments as constexprs, about 6 us on a server CPU, and a
selective-scan launch computed eight of them (a third of its wrapper's host time). At batch 1 a prefill
is host-bound (docs/benchmarks.md), so launches use these plain-Python equivalents instead. Kernel bodies
keep ``tl.cdiv``.

:func:`op_function`: each differentiable kernel is a custom op with its autograd registered
(``register_autograd``), which is what torch.compile and direct op users see. torch.library runs that
registration through a generated wrapper that, at every forward with gradients, rebuilds the argument
list from the op's schema (``fill_defaults``: 36 us for a 13-argument op on the CPU machine). A training
step calls three such ops in every Mamba-1 layer, forward and backward, while the GPU waits, so the
entry points call the op inside a plain ``torch.autograd.Function`` with the same ``setup_context`` and
backward instead: the op then takes its no-grad path, and nothing else changes.

:func:`call_op`: even without autograd, calling a custom op goes through the dispatcher (schema checks, the
Autograd, ADInplaceOrView and Python-dispatch keys, a ``torch._dynamo.disable`` wrapper around the body):
about 20 us a call, and a batch-1 prefill of a 24-layer Mamba-1 makes 73 such calls while the GPU idles.
Where none of that has a job (not tracing, no dispatch mode such as FakeTensorMode or FlopCounterMode, no
tensor subclass such as DTensor, no input that needs a gradient), :func:`call_op` runs the op's Python body
directly, which launches the same kernels. Ops that mutate an argument always take the dispatcher (it
bumps the mutated tensors' version counters, which autograd checks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, as ``triton.cdiv``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _needs_dispatcher(args: tuple[Any, ...]) -> bool:
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return True
    grad = torch.is_grad_enabled()
    for arg in args:
        if isinstance(arg, torch.Tensor) and (type(arg) not in _PLAIN_TENSOR_TYPES or (grad and arg.requires_grad)):
            return True
    return False


def call_op(op: Any, *args: Any) -> Any:
    """``op(*args)`` for a ``torch.library`` custom op that mutates none of its arguments, running its
    Python body directly where the dispatcher has nothing to do (see the module docstring)."""
    if _needs_dispatcher(args):
        return op(*args)
    return op._init_fn(*args)


def op_function(op: Callable[..., Any], setup_context: Callable[..., None], backward: Callable[..., Any],
                differentiable_outputs: int) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` computing ``op(*inputs)`` (a custom op returning a tuple) with the
    op's registered autograd: ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` (one
    grad per output; returns one per input). Outputs past the first ``differentiable_outputs`` (saved
    tensors the op returns for its backward) are marked non-differentiable. Grads are materialized as the
    registered autograd has them. Use ``.apply(*inputs)`` where inputs may need gradients."""

    class OpFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *inputs: Any) -> Any:
            output = call_op(op, *inputs)  # grad mode is off in here: the op's cheap no-grad path
            setup_context(ctx, inputs, output)
            if len(output) > differentiable_outputs:
                ctx.mark_non_differentiable(*output[differentiable_outputs:])
            return output

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx: Any, *grads: Any) -> Any:
            return backward(ctx, *grads)

    OpFunction.__name__ = OpFunction.__qualname__ = f"{getattr(op, '__name__', 'op')}_function"
    return OpFunction
