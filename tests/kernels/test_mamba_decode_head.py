"""The large-batch decoding step's LM head and greedy pick (kernels/mamba_decode/triton_head.py; Triton on
CPU through TRITON_INTERPRET=1 at small shapes) against ``reference.lm_head_logits_reference``: float32 /
bfloat16 / float16 weights, vocabularies that end inside a tile, padded LM heads, batches of one and of
several row tiles, a pick over several blocks of partials; torch.argmax's pick exactly: ties to the first
index within and across tiles, NaNs as the maximum, rows of -inf; strided inputs and outputs;
torch.library checks; errors. decode_step's use of it: tests/core/test_cuda_graph.py; the real shapes on
a GPU: scripts/gpu_checks/mamba_decode.py (--head)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels.dispatch import forced_backend
from kernels.mamba_decode import lm_head_logits, lm_head_logits_unsupported

# The shared helpers beside this file (pytest imports tests with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_block import DEVICE, rel, rnd, triton_kernels  # noqa: E402

triton_head = triton_kernels("kernels.mamba_decode.triton_head")
import triton  # noqa: E402  (importable: triton_kernels skipped the module otherwise)
import triton.language as tl  # noqa: E402

OP = "lm_head_logits"


def run(backend: str, hidden: torch.Tensor, weight: torch.Tensor, vocab: int):
    """(logits, greedy pick) of one backend; the pick's buffer starts as garbage."""
    greedy = torch.full((hidden.shape[0],), -7, dtype=torch.long, device=hidden.device)
    with forced_backend(backend, OP):
        logits = lm_head_logits(hidden, weight, vocab, greedy)
    return logits, greedy


@pytest.mark.parametrize("batch,vocab,padded,d_model", [
    (5, 300, 304, 40),  # the vocabulary ends inside a tile; two padded rows never read
    (1, 129, 130, 16),  # one row (a 16-row tensor-core tile), a one-column last tile
    (17, 1000, 1000, 72),  # a K loop with a short last step
    (70, 200, 256, 24),  # two row tiles
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(batch, vocab, padded, d_model, dtype):
    hidden, weight = rnd(batch, d_model, seed=1, dtype=dtype), rnd(padded, d_model, seed=2, dtype=dtype)
    if dtype != torch.float32:
        # Small integers: every sum is exact in float32 whatever its order, so the logits rounded to 16
        # bits must equal F.linear's bit for bit, and their many ties test the first-index pick.
        hidden, weight = (t.mul(1.5).round().clamp(-3, 3) for t in (hidden, weight))
    logits, greedy = run("triton", hidden, weight, vocab)
    ref_logits, ref_greedy = run("reference", hidden, weight, vocab)
    assert logits.dtype == torch.float32 and logits.shape == (batch, vocab)
    if dtype == torch.float32:
        assert rel(logits, ref_logits) < 1e-6
    else:
        assert torch.equal(logits, ref_logits)
    assert torch.equal(greedy, ref_greedy)
    assert torch.equal(greedy, torch.argmax(logits, dim=-1))  # the pick of the logits it returns


def test_pick_over_several_blocks_of_partials(monkeypatch):
    """16-column tiles and a pick loop of 4 partials a step: ties between tiles in different blocks go
    to the first tile."""
    monkeypatch.setitem(triton_head.TILES, "BN", 16)
    monkeypatch.setattr(triton_head, "PICK_BLOCK", 4)
    hidden = torch.zeros(3, 16, device=DEVICE)
    weight = torch.zeros(300, 16, device=DEVICE)
    hidden[0, 0] = 1.0
    weight[[20, 90, 250], 0] = 1.0  # row 0: tiles 1, 5 and 15 (blocks 0, 1 and 3) tie
    hidden[1, 0] = -1.0  # row 1: all logits 0 but three at -1: the first maximal one is column 0
    hidden[2, 1] = 1.0
    weight[[7, 299], 1] = 2.0  # row 2: within a tile and across: column 7; 299 is past vocab 290
    logits, greedy = run("triton", hidden, weight, 290)
    assert greedy.tolist() == [20, 0, 7]
    assert torch.equal(greedy, torch.argmax(logits, dim=-1))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's matmul making the NaNs
def test_nans_and_infinities_pick_as_torch_argmax(monkeypatch):
    monkeypatch.setitem(triton_head.TILES, "BN", 16)
    monkeypatch.setattr(triton_head, "PICK_BLOCK", 4)
    # Infinities and NaNs come from the hidden rows only: a NaN or infinite weight would reach every row.
    hidden = torch.zeros(4, 16, device=DEVICE)
    weight = torch.zeros(200, 16, device=DEVICE)
    hidden[0, 0] = float("nan")  # every logit of row 0 NaN: column 0
    hidden[1, 1] = float("inf")
    weight[:, 1] = -1.0
    weight[[150, 60], 1] = 0.0  # row 1: inf * 0, NaNs at 60 and 150, beat +inf at 3
    weight[3, 1] = 1.0
    hidden[2, 2] = float("-inf")
    weight[:, 2] = 1.0  # row 2: every logit -inf: column 0
    hidden[3, 3] = float("inf")
    weight[:, 3] = -1.0
    weight[170, 3] = 1.0  # row 3: +inf beats the -inf around it
    logits, greedy = run("triton", hidden, weight, 200)
    ref_logits, _ = run("reference", hidden, weight, 200)
    assert torch.equal(logits.isnan(), ref_logits.isnan())
    assert greedy.tolist() == [0, 60, 0, 170] == torch.argmax(ref_logits, dim=-1).tolist()


@triton.jit
def _keys_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, triton_head._order_key(tl.load(x_ptr + offs)))


def test_order_keys_rank_as_torch_argmax():
    """The int32 keys the partials compare: the order of the floats, -0.0 tied with +0.0, every NaN above
    +inf and tied with every other NaN."""
    values = torch.tensor([float("-inf"), -3e38, -1.5, -1e-40, -0.0, 0.0, 1e-40, 1.0, 2.5, 3e38, float("inf"),
                           float("nan"), -float("nan"), 7.0, -7.0, 0.5], device=DEVICE)
    keys = torch.empty(16, dtype=torch.int32, device=DEVICE)
    _keys_kernel[(1,)](values, keys, N=16)
    for i in range(16):
        for j in range(16):
            a, b = values[i].item(), values[j].item()
            nan_a, nan_b = a != a, b != b
            if nan_a or nan_b:
                want = (nan_a and not nan_b) - (nan_b and not nan_a)
            else:
                want = (a > b) - (a < b)
            got = (keys[i] > keys[j]).item() - (keys[i] < keys[j]).item()
            assert got == want, (a, b)


def test_strided_inputs_and_greedy_buffer():
    hidden = rnd(6, 64, seed=3)[:, ::2]  # [6, 32], feature stride 2
    weight = rnd(100, 32, seed=4)
    greedy = torch.zeros(6, 2, dtype=torch.long, device=DEVICE)[:, 1]  # a column of a wider buffer
    with forced_backend("triton", OP):
        logits = lm_head_logits(hidden, weight, 97, greedy)
    assert rel(logits, F.linear(hidden, weight)[:, :97]) < 1e-6
    assert torch.equal(greedy, torch.argmax(logits, dim=-1))
    with forced_backend("triton", OP):
        assert torch.equal(lm_head_logits(hidden, weight, 97), logits)  # no pick asked for


def test_library_op_checks():
    hidden, weight = rnd(5, 40, seed=5), rnd(50, 40, seed=6)
    torch.library.opcheck(triton_head.lm_head_logits_op, (hidden, weight, 47, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    _, pkey, pidx = triton_head.lm_head_logits_op(hidden, weight, 47, True)
    torch.library.opcheck(triton_head.greedy_pick_op, (pkey, pidx, torch.zeros(5, dtype=torch.long, device=DEVICE)),
                          test_utils=("test_schema", "test_faketensor"))


def test_errors():
    hidden, weight = rnd(4, 16), rnd(8, 16)
    with pytest.raises(ValueError, match=r"hidden must be \[B, d_model\]"):
        lm_head_logits(hidden, weight[:, :-1], 8)
    with pytest.raises(ValueError, match="vocab_size 9 must be in 1..8"):
        lm_head_logits(hidden, weight, 9)
    with pytest.raises(ValueError, match=r"greedy_out must be int64 \[4\]"):
        lm_head_logits(hidden, weight, 8, torch.zeros(4, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"greedy_out must be int64 \[4\]"):
        lm_head_logits(hidden, weight, 8, torch.zeros(3, dtype=torch.long, device=DEVICE))
    assert "share one" in lm_head_logits_unsupported(hidden, weight.double())
    assert lm_head_logits_unsupported(hidden.bfloat16(), weight.bfloat16()) is None
    with forced_backend("triton", OP), pytest.raises(ValueError, match="share one.*reference backend"):
        lm_head_logits(hidden, weight.half(), 8)
