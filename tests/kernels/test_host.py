"""kernels/host.py: the launch helpers equal Triton's own (which cost ~6 us a host call in Triton 3.6),
``op_function`` gives a custom op's registered autograd through a plain autograd.Function, and
``call_op`` skips the dispatcher only where it has nothing to do."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.host import call_op, cdiv, next_power_of_2, op_function

triton = pytest.importorskip("triton")


def test_cdiv_matches_triton():
    for a in range(0, 300):
        for b in (1, 2, 3, 7, 16, 64, 128, 255):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    assert cdiv(2**40 + 1, 2**20) == triton.cdiv(2**40 + 1, 2**20) == 2**20 + 1


def test_next_power_of_2_matches_triton():
    for n in list(range(0, 1100)) + [2**31 - 1, 2**31, 2**31 + 1, 3 * 2**40]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


@torch.library.custom_op("ssm_suite_test::scale_and_stats", mutates_args=())
def _scale_and_stats(x: torch.Tensor, w: torch.Tensor, flag: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A toy op shaped like the kernels' forward ops: an output and a saved tensor for the backward."""
    return x * w, (x * x).sum(-1)


@_scale_and_stats.register_fake
def _(x, w, flag):
    return torch.empty_like(x), x.new_empty(x.shape[:-1])


def _setup(ctx, inputs, output):
    x, w, flag = inputs
    ctx.save_for_backward(x, w)
    ctx.flag = flag


def _backward(ctx, dy, dstats):
    x, w = ctx.saved_tensors
    assert ctx.flag is True
    return dy * w, (dy * x).sum(0), None


_scale_and_stats.register_autograd(_backward, setup_context=_setup)


def test_op_function_matches_the_registered_autograd():
    function = op_function(_scale_and_stats, _setup, _backward, differentiable_outputs=1)
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(4, requires_grad=True)
    y, stats = function.apply(x, w, True)
    assert not stats.requires_grad and y.requires_grad  # the saved output is not differentiable
    y.square().sum().backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    y_op, _ = _scale_and_stats(x, w, True)  # the op's own (torch.library) autograd
    y_op.square().sum().backward()
    assert torch.equal(y, y_op) and torch.equal(grads[0], x.grad) and torch.equal(grads[1], w.grad)
    torch.library.opcheck(_scale_and_stats, (x.detach(), w.detach(), True))


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_call_op_runs_the_body_directly_in_plain_eager():
    x, w = torch.randn(3, 4), torch.nn.Parameter(torch.randn(4))
    expected = _scale_and_stats(x, w, True)
    with mock.patch.object(_scale_and_stats, "_opoverload", side_effect=AssertionError("dispatcher used")):
        with torch.no_grad():
            got = call_op(_scale_and_stats, x, w, True)
        got_grad_mode = call_op(_scale_and_stats, x, w.detach(), True)  # grad mode on, nothing requires grad
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    assert torch.equal(got_grad_mode[0], expected[0])


def test_call_op_takes_the_dispatcher_where_it_has_a_job():
    x, w = torch.randn(3, 4), torch.randn(4)
    # A dispatch mode (FakeTensorMode, FlopCounterMode, ...) must see the op itself.
    with _RecordOps() as mode:
        call_op(_scale_and_stats, x, w, True)
    assert any("scale_and_stats" in name for name in mode.names), mode.names
    # An input that needs a gradient: the registered autograd runs.
    w_grad = w.clone().requires_grad_()
    y, _ = call_op(_scale_and_stats, x, w_grad, True)
    y.sum().backward()
    assert torch.allclose(w_grad.grad, x.sum(0))
    # Traced by torch.compile: the op stays one node, no graph break (fullgraph).
    compiled = torch.compile(lambda a, b: call_op(_scale_and_stats, a, b, True)[0] + 1, backend="aot_eager",
                             fullgraph=True)
    assert torch.equal(compiled(x, w), x * w + 1)
