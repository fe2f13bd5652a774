"""decode_step with the fused Mamba-1 block step (kernels.mamba_decode, Triton through
TRITON_INTERPRET=1 on CPU) against the op-by-op step it replaces: logits and states over several
teacher-forced steps (pure Mamba-1, a hybrid whose fused blocks hand the stream to attention / MLP
blocks and back, a bfloat16 stream, bfloat16 weights), greedy tokens through the graph decoder's code
path, and which blocks take the fused path (Jamba's inner norms, biases and float64 fall back; CPU
without a forced backend keeps the op-by-op step). The fused Mamba-2 block step likewise: pure Mamba-2,
a hybrid of Mamba-1 / Mamba-2 / attention / MLP blocks whose fused blocks hand the stream to each other,
bfloat16, its batch limit and its off switch (SSM_SUITE_FUSED_MAMBA2_DECODE=0)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

pytest.importorskip("triton")

import core.cuda_graph as cuda_graph  # noqa: E402
from core.backbone import CausalLM  # noqa: E402
from core.config import AttentionConfig, Mamba1Config, Mamba2Config, ModelConfig  # noqa: E402
from core.cuda_graph import (CUDAGraphDecoder, allocate_decode_cache, decode_row_groups, decode_step,  # noqa: E402
                             decode_step_path, fused_logits, fused_mamba1_blocks, fused_mamba2_blocks, head_kernel,
                             partials_mamba1_blocks)
from core.generate import generate  # noqa: E402
from kernels.dispatch import forced_backend  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
OP = "mamba1_decode_block"
OP2 = "mamba2_decode_block"


def config(pattern: str, **overrides) -> ModelConfig:
    values = dict(d_model=32, pattern=pattern, vocab_size=61, mamba1=Mamba1Config(d_state=8),
                  mamba2=Mamba2Config(d_state=8, headdim=8, ngroups=2),
                  attention=AttentionConfig(n_heads=4, n_kv_heads=2, rope=True))
    values.update(overrides)
    return ModelConfig(**values)


def build(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(cfg).to(DEVICE, dtype).eval()
    with torch.no_grad():  # D = 1 and tiny conv biases at init; random ones exercise more of the step
        for block in model.backbone.layers:
            if hasattr(block.mixer, "D"):
                block.mixer.D.normal_()
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def prefilled(model: CausalLM, batch: int, steps: int, ssm_state_dtype: torch.dtype | None = None):
    """A cache after a prefill of 5 random tokens, and ``steps`` fixed tokens [steps, B] to decode next."""
    torch.manual_seed(1)
    ids = torch.randint(0, 61, (batch, 5), device=DEVICE)
    tokens = torch.randint(0, 61, (steps, batch), device=DEVICE)
    cache = allocate_decode_cache(model, batch, 5 + steps, torch.device(DEVICE), ssm_state_dtype)
    with torch.no_grad():
        model(ids, cache=cache)
    return cache, tokens


def teacher_forced(model: CausalLM, batch: int, steps: int, fused: bool):
    """Prefill 5 tokens, then ``steps`` decode steps on fixed tokens; (logits [steps, B, V], cache)."""
    cache, tokens = prefilled(model, batch, steps)
    backend = "triton" if fused else "reference"
    with forced_backend(backend, OP), forced_backend(backend, OP2):
        logits = torch.stack([decode_step(model, token, cache) for token in tokens])
    return logits, cache


@pytest.mark.parametrize("pattern,batch,overrides", [
    ("SS", 2, {}),
    ("S*S-", 3, {}),  # fused blocks hand the stream to attention / MLP blocks and take it back
    ("-SS", 17, {}),  # the first block is not fused; tl.dot tiles (past the default batch limit)
    ("SS", 2, {"residual_in_fp32": False}),  # a stream in the model dtype
], ids=["mamba1", "hybrid", "mlp-first-dot", "stream-in-model-dtype"])
def test_fused_step_equals_op_by_op_step(pattern, batch, overrides, monkeypatch):
    monkeypatch.setattr(cuda_graph, "FUSED_MAMBA1_MAX_BATCH", None)
    model = build(config(pattern, **overrides))
    assert fused_mamba1_blocks(model, batch) == [False] * len(pattern)  # CPU default: op by op
    with forced_backend("triton", OP):
        assert fused_mamba1_blocks(model, batch) == [c == "S" for c in pattern]
        assert decode_step_path(model, batch).startswith("fused Mamba-1 step")
    fused, cache_f = teacher_forced(model, batch, 3, fused=True)
    plain, cache_p = teacher_forced(model, batch, 3, fused=False)
    assert rel(fused, plain) < 1e-5
    for layer_f, layer_p, char in zip(cache_f.layers, cache_p.layers, pattern):
        if char == "S":
            assert rel(layer_f.ssm_state, layer_p.ssm_state) < 1e-5
            assert rel(layer_f.conv_state, layer_p.conv_state) < 1e-5
    assert cache_f.seqlen_offset == cache_p.seqlen_offset == 8


@pytest.mark.parametrize("pattern", ["SS", "S*S-"])  # the last block fused (stream in residual) or not
def test_logits_in_one_kernel(pattern):
    """The step's end as one kernel (final norm + LM head + float32 logits, kernels.mamba_decode.decode_logits)
    equals the op-by-op end; it is used for at most 4 rows."""
    model = build(config(pattern))
    assert not fused_logits(model, 2)  # CPU default: the reference backend
    with forced_backend("triton", "decode_logits"):
        assert fused_logits(model, 2) and not fused_logits(model, 5)
        assert decode_step_path(model, 2).endswith("logits in one kernel")
        fused, _ = teacher_forced(model, 2, 3, fused=True)
    plain, _ = teacher_forced(model, 2, 3, fused=True)
    assert fused.shape == plain.shape and rel(fused, plain) < 1e-5
    assert not torch.equal(fused, plain)  # the kernel did run: other orders of additions


def test_bfloat16_model():
    """bfloat16 weights: the fused step rounds where the op-by-op step rounds (on CPU too, by hand)."""
    model = build(config("SS"), torch.bfloat16)
    fused, _ = teacher_forced(model, 2, 3, fused=True)
    plain, _ = teacher_forced(model, 2, 3, fused=False)
    assert rel(fused, plain) < 1e-3
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))


def test_greedy_tokens_through_the_graph_code_path():
    """The graph decoder's static-buffer step (run eagerly here) with the fused blocks gives eager
    op-by-op generate's tokens."""
    model = build(config("SS"))
    prompts = [[5, 9, 2, 7, 1], [4], [11, 6, 2]]
    eager = generate(model, prompts, max_new_tokens=6, temperature=0, cuda_graph=False)
    with forced_backend("triton", OP):
        graphed = generate(model, prompts, max_new_tokens=6, temperature=0,
                           cuda_graph=CUDAGraphDecoder(model, capture=False))
    assert graphed.sequences() == eager.sequences()


def test_batch_limit(monkeypatch):
    """Past FUSED_MAMBA1_MAX_BATCH rows decode_step runs op by op (the H100 measured the op-by-op step
    faster at batch 64); None lifts the limit."""
    model = build(config("SS"))
    limit = cuda_graph.FUSED_MAMBA1_MAX_BATCH
    with forced_backend("triton", OP):
        assert fused_mamba1_blocks(model, limit) == [True, True]
        assert fused_mamba1_blocks(model, limit + 1) == [False, False]
        assert decode_step_path(model, 64) == "op by op (fused add+norm)"
        # The step itself follows the rule: past the limit it equals the op-by-op step bit for bit.
        forced, _ = teacher_forced(model, limit + 1, 1, fused=True)
        monkeypatch.setattr(cuda_graph, "FUSED_MAMBA1_MAX_BATCH", None)
        assert fused_mamba1_blocks(model, 64) == [True, True]
    plain, _ = teacher_forced(model, limit + 1, 1, fused=False)
    assert torch.equal(forced, plain)


def test_blocks_the_fused_step_cannot_take_run_op_by_op():
    jamba = build(config("S-S", mamba1=Mamba1Config(d_state=8, inner_norms=True)))
    biased = build(config("SS", mamba1=Mamba1Config(d_state=8, bias=True)))
    double = build(config("SS"), torch.float64)
    with forced_backend("triton", OP):
        assert fused_mamba1_blocks(jamba) == [False, False, False]
        assert "inner norms" in jamba.backbone.layers[0].mixer.fused_step_unsupported()
        assert fused_mamba1_blocks(biased) == [False, False]
        assert "biases" in biased.backbone.layers[0].mixer.fused_step_unsupported()
        assert fused_mamba1_blocks(double) == [False, False]
        assert decode_step_path(double) == "op by op (fused add+norm)"
        # They still decode (op by op), equal to the reference backend's run.
        forced, _ = teacher_forced(jamba, 2, 2, fused=True)
    plain, _ = teacher_forced(jamba, 2, 2, fused=False)
    assert torch.equal(forced, plain)


# --------------------------------------------------------------------------------------------------
# The fused Mamba-2 block step (opt-in)


@pytest.mark.parametrize("pattern,batch", [
    ("MM", 2),
    ("SM*M-", 3),  # fused Mamba-1 and Mamba-2 blocks hand the stream to each other and to attention / MLP
    ("-MM", 17),  # tl.dot tiles (past the default batch limit)
])
def test_fused_mamba2_step_equals_op_by_op_step(pattern, batch, monkeypatch):
    model = build(config(pattern))
    monkeypatch.setattr(cuda_graph, "FUSED_MAMBA2_MAX_BATCH", None)
    monkeypatch.setenv(cuda_graph.FUSED_MAMBA2_ENV, "0")
    with forced_backend("triton", OP2):
        assert fused_mamba2_blocks(model, batch) == [False] * len(pattern)  # turned off
    monkeypatch.delenv(cuda_graph.FUSED_MAMBA2_ENV)
    assert fused_mamba2_blocks(model, batch) == [False] * len(pattern)  # CPU default: op by op
    with forced_backend("triton", OP2), forced_backend("triton", OP):
        assert fused_mamba2_blocks(model, batch) == [c == "M" for c in pattern]
        assert "Mamba-2 " in decode_step_path(model, batch if batch <= 4 else 1)
    fused, cache_f = teacher_forced(model, batch, 3, fused=True)
    plain, cache_p = teacher_forced(model, batch, 3, fused=False)
    assert rel(fused, plain) < 1e-5
    for layer_f, layer_p in zip(cache_f.layers, cache_p.layers):
        for name in ("conv_state", "ssm_state"):
            if hasattr(layer_p, name):
                assert rel(getattr(layer_f, name), getattr(layer_p, name)) < 1e-5, name


def test_mamba2_batch_limit():
    """Past FUSED_MAMBA2_MAX_BATCH rows the Mamba-2 blocks run op by op (slower fused at batch 64 on an H100)."""
    model = build(config("MM"))
    limit = cuda_graph.FUSED_MAMBA2_MAX_BATCH
    with forced_backend("triton", OP2):
        assert fused_mamba2_blocks(model, limit) == [True, True]
        assert fused_mamba2_blocks(model, limit + 1) == [False, False]


def test_fused_mamba2_bfloat16_model(monkeypatch):
    model = build(config("MM"), torch.bfloat16)
    fused, _ = teacher_forced(model, 2, 3, fused=True)
    plain, _ = teacher_forced(model, 2, 3, fused=False)
    assert rel(fused, plain) < 2e-2
    assert (fused.argmax(-1) == plain.argmax(-1)).float().mean() >= 0.8


def test_fused_mamba2_greedy_tokens_through_the_graph_code_path(monkeypatch):
    model = build(config("MM"))
    prompts = [[5, 9, 2, 7, 1], [4], [11, 6, 2]]
    eager = generate(model, prompts, max_new_tokens=6, temperature=0, cuda_graph=False)
    with forced_backend("triton", OP2):
        graphed = generate(model, prompts, max_new_tokens=6, temperature=0,
                           cuda_graph=CUDAGraphDecoder(model, capture=False))
    assert graphed.sequences() == eager.sequences()


def test_mamba2_blocks_the_fused_step_cannot_take_run_op_by_op(monkeypatch):
    biased = build(config("MM", mamba2=Mamba2Config(d_state=8, headdim=8, bias=True)))
    gated = build(config("MM", mamba2=Mamba2Config(d_state=8, headdim=8, norm_before_gate=True)))
    double = build(config("MM"), torch.float64)
    with forced_backend("triton", OP2):
        assert fused_mamba2_blocks(biased) == [False, False]
        assert fused_mamba2_blocks(gated) == [False, False]
        assert fused_mamba2_blocks(double) == [False, False]
        assert decode_step_path(double) == "op by op (fused add+norm)"


def test_large_batch_step_runs_dt_proj_inside_the_scan_kernel(monkeypatch):
    """Past FUSED_MAMBA1_MAX_BATCH, Mamba1's own step takes mamba1_scan_step (dt_proj inside the scan
    kernel) where its triton backend is chosen; the logits equal the op-by-op step's."""
    import kernels.mamba_decode.triton as fused

    calls = []
    real = fused.mamba1_scan_step_op
    monkeypatch.setattr(fused, "mamba1_scan_step_op", lambda *a: calls.append(1) or real(*a))
    model = build(config("S*S-"))
    batch = cuda_graph.FUSED_MAMBA1_MAX_BATCH + 1
    torch.manual_seed(1)
    ids = torch.randint(0, 61, (batch, 5), device=DEVICE)
    tokens = torch.randint(0, 61, (3, batch), device=DEVICE)
    logits = {}
    for backend in ("triton", "reference"):
        cache = model.allocate_cache(batch, 8)
        with torch.no_grad():
            model(ids, cache=cache)
        with forced_backend(backend, "mamba1_scan_step"):
            logits[backend] = torch.stack([decode_step(model, t, cache) for t in tokens])
    assert len(calls) == 3 * 2  # two Mamba-1 layers, three steps, triton only
    assert rel(logits["triton"], logits["reference"]) < 1e-5


SPLIT_OPS = ("linear_partials", "add_norm_partials", "conv_step_partials")


def split_k_steps(model: CausalLM, batch: int, steps: int, on: bool, ssm_state_dtype: torch.dtype | None = None):
    """teacher_forced's step with the split-K ops on their triton backend (``on``: decode_step takes the
    split-K path where it can) or on their reference backend (the path is off: cuBLAS-style op by op)."""
    cache, tokens = prefilled(model, batch, steps, ssm_state_dtype)
    backend = "triton" if on else "reference"
    with forced_backend(backend, SPLIT_OPS[0]), forced_backend(backend, SPLIT_OPS[1]), \
            forced_backend(backend, SPLIT_OPS[2]):
        path = decode_step_path(model, batch, ssm_state_dtype)
        logits = torch.stack([decode_step(model, token, cache) for token in tokens])
    return logits, cache, path


@pytest.mark.parametrize("pattern,batch,overrides", [
    ("SS", 5, {}),
    ("S*SM-S", 6, {}),  # partials hand the stream to attention / Mamba-2 / MLP norms; the last norm sums them
    ("SS", 17, {"residual_in_fp32": False}),  # a stream in the model dtype; tl.dot scan tiles
], ids=["mamba1", "hybrid", "stream-in-model-dtype"])
def test_split_k_step_equals_op_by_op_step(pattern, batch, overrides):
    """Past FUSED_MAMBA1_MAX_BATCH, Mamba-1 blocks run in_proj, x_proj and out_proj as split-K partial
    products (Mamba1.step_partials) where linear_partials runs on triton: the logits and the states equal
    the op-by-op step's up to the order of additions."""
    model = build(config(pattern, **overrides))
    split, cache, path = split_k_steps(model, batch, 3, on=True)
    plain, plain_cache, plain_path = split_k_steps(model, batch, 3, on=False)
    n = pattern.count("S")
    assert path == f"op by op (fused add+norm; split-K in_proj / x_proj / out_proj in {n}/{len(pattern)} blocks)"
    assert plain_path == "op by op (fused add+norm)"
    assert rel(split, plain) < 1e-5
    for layer, plain_layer in zip(cache.layers, plain_cache.layers):
        for name in ("conv_state", "ssm_state"):
            if hasattr(layer, name):
                assert rel(getattr(layer, name), getattr(plain_layer, name)) < 1e-5


def test_split_k_step_limits(monkeypatch):
    """The split-K path needs a batch past the fused step's limit and within its own, and a Mamba-1 block
    without biases or inner norms; the greedy tokens through the graph runner's code path follow it."""
    model = build(config("SS"))
    with forced_backend("triton", SPLIT_OPS[0]):
        assert partials_mamba1_blocks(model, cuda_graph.FUSED_MAMBA1_MAX_BATCH) == [False, False]
        assert partials_mamba1_blocks(model, cuda_graph.PARTIALS_MAMBA1_MAX_BATCH + 1) == [False, False]
        assert partials_mamba1_blocks(model, 8) == [True, True]
        monkeypatch.setattr(cuda_graph, "FUSED_MAMBA1_MAX_BATCH", None)  # the fused step at every batch
        assert partials_mamba1_blocks(model, 8) == [False, False]
    monkeypatch.undo()
    biased = build(config("SS", mamba1=Mamba1Config(d_state=8, bias=True)))
    jamba = build(config("SS", mamba1=Mamba1Config(d_state=8, inner_norms=True)))
    with forced_backend("triton", SPLIT_OPS[0]):
        assert partials_mamba1_blocks(biased, 8) == [False, False]
        assert "biases" in biased.backbone.layers[0].mixer.partials_step_unsupported()
        assert partials_mamba1_blocks(jamba, 8) == [False, False]
    assert partials_mamba1_blocks(model, 8) == [False, False]  # CPU: linear_partials' reference backend
    torch.manual_seed(2)
    prompts = torch.randint(0, 61, (6, 4), device=DEVICE)
    tokens = {}
    for backend in ("triton", "reference"):
        with forced_backend(backend, SPLIT_OPS[0]), forced_backend(backend, SPLIT_OPS[1]), \
                forced_backend(backend, SPLIT_OPS[2]):
            decoder = CUDAGraphDecoder(model, capture=False)
            tokens[backend] = generate(model, prompts, max_new_tokens=5, temperature=0, cuda_graph=decoder).tokens
    assert torch.equal(tokens["triton"], tokens["reference"])


def test_row_groups_equal_one_group(monkeypatch):
    """Where every block takes the split-K step, the SSM states are 16-bit and the batch reaches
    ROW_GROUPS_MIN_BATCH, decode_step runs the blocks on two row groups (concurrently on CUDA) and the LM
    head on all rows: the same kernels on fewer rows, so the logits, the states and the greedy tokens
    equal the one-group step's bit for bit."""
    model = build(config("SS"))
    bf16 = torch.bfloat16
    monkeypatch.setattr(cuda_graph, "ROW_GROUPS_MIN_BATCH", 10)
    with forced_backend("triton", SPLIT_OPS[0]):
        too_large = cuda_graph.PARTIALS_MAMBA1_MAX_BATCH + 1
        assert [decode_row_groups(model, b, ssm_state_dtype=bf16) for b in (9, 10, 12, too_large)] == [1, 2, 2, 1]
        assert decode_row_groups(model, 12) == 1  # float32 states: two groups were slower on an H100
        assert decode_row_groups(build(config("S*S")), 12, ssm_state_dtype=bf16) == 1  # attention's cache
        monkeypatch.setattr(cuda_graph, "ROW_GROUPS_MIN_BATCH", 8)
        assert decode_row_groups(model, 8, ssm_state_dtype=bf16) == 1  # groups of 4: the fused block step
        monkeypatch.setattr(cuda_graph, "ROW_GROUPS_MIN_BATCH", 10)
    assert decode_row_groups(model, 12, ssm_state_dtype=bf16) == 1  # CPU default: the reference backend
    grouped, grouped_cache, path = split_k_steps(model, 12, 3, on=True, ssm_state_dtype=bf16)
    assert path.startswith("2 row groups of 6 concurrently, each op by op (fused add+norm; split-K")
    assert split_k_steps(model, 12, 1, on=True)[2].startswith("op by op")
    monkeypatch.setattr(cuda_graph, "ROW_GROUPS_MIN_BATCH", None)
    whole, whole_cache, path = split_k_steps(model, 12, 3, on=True, ssm_state_dtype=bf16)
    assert path.startswith("op by op")
    assert torch.equal(grouped, whole)
    for layer, whole_layer in zip(grouped_cache.layers, whole_cache.layers):
        assert torch.equal(layer.conv_state, whole_layer.conv_state)
        assert torch.equal(layer.ssm_state, whole_layer.ssm_state)
    torch.manual_seed(4)
    prompts = torch.randint(0, 61, (12, 4), device=DEVICE)
    tokens = {}
    for groups_from in (10, None):
        monkeypatch.setattr(cuda_graph, "ROW_GROUPS_MIN_BATCH", groups_from)
        with forced_backend("triton", SPLIT_OPS[0]), forced_backend("triton", SPLIT_OPS[1]), \
                forced_backend("triton", SPLIT_OPS[2]), forced_backend("triton", "lm_head_logits"):
            decoder = CUDAGraphDecoder(model, capture=False)
            tokens[groups_from] = generate(model, prompts, max_new_tokens=4, temperature=0, cuda_graph=decoder,
                                           ssm_state_dtype=bf16).tokens
    assert torch.equal(tokens[10], tokens[None])


def test_split_k_output_handed_to_a_fused_block(monkeypatch):
    """A fused block after a split-K block (the fused Mamba-2 step opted in past its batch limit) gets the
    previous output as the summed, rounded partials: the logits equal the op-by-op step's."""
    monkeypatch.setattr(cuda_graph, "FUSED_MAMBA2_MAX_BATCH", None)
    monkeypatch.setenv(cuda_graph.FUSED_MAMBA2_ENV, "1")
    model = build(config("SMS"))
    with forced_backend("triton", OP2):
        assert fused_mamba2_blocks(model, 6) == [False, True, False]
        split, _, path = split_k_steps(model, 6, 3, on=True)
    assert path == ("fused block steps (Mamba-2 1/3 blocks; others op by op, split-K in_proj / x_proj / out_proj "
                    "in 2/3 blocks)")
    with forced_backend("triton", SPLIT_OPS[0]):
        assert partials_mamba1_blocks(model, 6) == [True, False, True]
    with forced_backend("reference", OP2):
        plain, _, _ = split_k_steps(model, 6, 3, on=False)
    assert rel(split, plain) < 1e-5


def test_lm_head_kernel_and_greedy_pick(monkeypatch):
    """Where lm_head_logits runs on triton, batches past decode_logits' end the step with its kernels (the
    LM head writing float32 logits, the greedy pick): the logits equal the cuBLAS-style end's, the pick
    written into greedy_out is their argmax, and the graph runner's greedy tokens are eager generate's."""
    model = build(config("S*S"))
    assert not head_kernel(model, 6)  # CPU default: the reference backend
    with forced_backend("triton", "lm_head_logits"):
        assert head_kernel(model, 6) and head_kernel(model, cuda_graph.HEAD_KERNEL_MAX_BATCH)
        assert not head_kernel(model, cuda_graph.HEAD_KERNEL_MAX_BATCH + 1)
        assert decode_step_path(model, 6).endswith("; LM head + greedy pick kernels")
        with forced_backend("triton", "decode_logits"):
            assert not head_kernel(model, 4) and head_kernel(model, 5)  # one kernel for both at <= 4 rows
    from kernels.mamba_decode import triton_head
    calls = []
    kernel = triton_head.lm_head_logits_triton
    monkeypatch.setattr(triton_head, "lm_head_logits_triton", lambda *args: calls.append(args[3]) or kernel(*args))
    logits, picks = {}, {}
    for backend in ("triton", "reference"):
        cache, tokens = prefilled(model, 6, 3)
        greedy = torch.full((3, 6), -1, dtype=torch.long, device=DEVICE)
        with forced_backend(backend, "lm_head_logits"):
            logits[backend] = torch.stack([decode_step(model, token, cache, greedy_out=out)
                                           for token, out in zip(tokens, greedy)])
        picks[backend] = greedy
    assert rel(logits["triton"], logits["reference"]) < 1e-5
    assert len(calls) == 3 and all(out is not None for out in calls)  # the kernels ran, asked for the pick
    assert torch.equal(picks["triton"], logits["triton"].argmax(-1))
    assert torch.equal(picks["reference"], logits["reference"].argmax(-1))
    torch.manual_seed(3)
    prompts = torch.randint(0, 61, (6, 4), device=DEVICE)
    eager = generate(model, prompts, max_new_tokens=5, temperature=0, cuda_graph=False)
    with forced_backend("triton", "lm_head_logits"):
        graphed = generate(model, prompts, max_new_tokens=5, temperature=0,
                           cuda_graph=CUDAGraphDecoder(model, capture=False))
    assert torch.equal(graphed.tokens, eager.tokens)
