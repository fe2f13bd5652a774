"""GPU checks and benchmarks of the fused Mamba-1 and Mamba-2 decoding steps (kernels/mamba_decode/).

``run_checks()``:
- the block step at mamba1-130m's shape (d_model 768, d_inner 1536, N 16, dt_rank 48) in bfloat16 and
  float32 against the float64 reference (new stream, sums of squares, conv and SSM states), next to the
  op-by-op bfloat16 step's own error, at batch 1, 3 (register GEMV tiles, x_proj partials), 5 and 64
  (tl.dot tiles), for the three forms of the stream; bit-identical re-runs;
- a random-init mamba1-130m (bf16, CUDA graphs): 64 teacher-forced steps, fused vs op-by-op logits
  (relative error per step) and argmax, at batch 1 and 64; 64 greedy tokens of the fused graph decoder
  against the op-by-op one, where a differing token is accepted only at a near-tie of the op-by-op
  logits (top-2 gap under ``TIE``);
- a batch whose SSM state passes 2^31 elements (64-bit offsets), rows at both ends against the
  reference.

The same for the fused Mamba-2 block step (kernels/mamba_decode/triton_mamba2.py, not yet run on a
GPU): the block step at mamba2-130m's shape (d_model 768, 24 heads of 64, N 128, 1 group) in bfloat16
and float32 against the float64 reference at batch 1, 3 (GEMV tiles) and 64 (tl.dot tiles); re-runs
bit-identical; a random-init mamba2-130m, 64 teacher-forced steps fused vs op by op at batch 1 and 64
(``SSM_SUITE_FUSED_MAMBA2_DECODE=1`` in the fused runner, ``0`` in the op-by-op one). ``--mamba2-only`` runs just those.

``run_bench()``: one decoding step of mamba1-130m (CUDA-graph replay: embedding, 24 blocks, final norm,
LM head) fused vs op by op, at batch 1 and 64, and one block step alone (graph of the op) with the bytes
it must move (weights + states) and GB/s. ``--sweep`` also times the tile settings in ``SWEEP`` (each
checked against the default tiles first).

The benchmark also times each fused step with programmatic dependent launch off (``SSM_SUITE_PDL=0``).
``--scan-step`` runs only the batch-16 / 64 op-by-op step with dt_proj inside the scan kernel
(``kernels.mamba_decode.mamba1_scan_step``) against dt_proj as its own matmul: teacher-forced logits
and step times; then the step time at batch 64 under the scan kernel's tile settings in ``SCAN_SWEEP``.
``--split-k`` does the same for the split-K matmuls (``SPLIT_SWEEP``); ``--head`` for the step's LM head +
greedy pick kernels (``kernels.mamba_decode.lm_head_logits``): the kernel against cuBLAS's F.linear at
mamba1-130m's head and odd shapes (logits, pick, re-runs) and timed against cuBLAS + float32 copy + argmax,
the step against the cuBLAS end at batch 16 / 64, then ``HEAD_SWEEP``.

Run on the GPU machine:  PYTHONPATH=. python3 scripts/gpu_checks/mamba_decode.py [--sweep] [--generate]
(``--generate`` then runs ``scripts/bench_generate.py --only throughput --presets mamba1-130m``, mamba_ssm
beside it where importable). On a CPU, through the Triton interpreter at tiny shapes (same code paths):
    PYTHONPATH=. python3 scripts/gpu_checks/mamba_decode.py --cpu-smoke
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[2])  # the repository root
    if "--cpu-smoke" in sys.argv:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

import kernels.mamba_decode.triton as mdt  # noqa: E402
from kernels.dispatch import forced_backend  # noqa: E402
from kernels.mamba_decode import decode_logits, mamba1_decode_block, mamba2_decode_block  # noqa: E402
from scripts.gpu_checks import check_row, compile_only_launches, graph_ms, nbytes, rel  # noqa: E402

DEV = "cuda"
SMOKE = False
MAMBA2_ONLY = False
OP = "mamba1_decode_block"
OP2 = "mamba2_decode_block"
OP_SCAN = "mamba1_scan_step"  # dt_proj + scan in one kernel: the op-by-op step's tail at batch > 4
OP_PARTIALS, OP_ADD_NORM, OP_CONV = "linear_partials", "add_norm_partials", "conv_step_partials"  # split-K step
OP_LOGITS = "decode_logits"  # final norm + LM head + float32 logits in one kernel (batch <= 4)
OP_HEAD = "lm_head_logits"  # LM head + float32 logits + greedy pick in two kernels (batch 5-64)
PDL_ENV = "SSM_SUITE_PDL"  # kernels.pdl
FUSED_MAMBA2_ENV = "SSM_SUITE_FUSED_MAMBA2_DECODE"  # core.cuda_graph.FUSED_MAMBA2_ENV
SHAPE2 = dict(d_model=768, nheads=24, headdim=64, d_state=128, ngroups=1, width=4)
SMOKE_SHAPE2 = dict(d_model=32, nheads=4, headdim=16, d_state=16, ngroups=2, width=4)
BATCHES2 = (1, 3, 64)
TIE = 0.05  # a greedy token may differ only where the op-by-op top-2 logits are closer than this
SHAPE = dict(d_model=768, d_inner=1536, d_state=16, dt_rank=48, width=4)
SMOKE_SHAPE = dict(d_model=32, d_inner=64, d_state=8, dt_rank=2, width=4)
BATCHES = (1, 3, 5, 64)
STEPS = 64
LARGE_BATCH = 90_000  # x 1536 x 16 state elements > 2^31
# Tile settings the sweep times: (batch, TILES override).
SWEEP = [
    (1, {"small": dict(mdt.TILES["small"])}),  # the defaults, timed beside the settings below
    (1, {"small": {**mdt.TILES["small"], "warps2": 8}}),
    (1, {"small": {**mdt.TILES["small"], "warps2": 2}}),
    (1, {"small": {**mdt.TILES["small"], "warps1": 2}}),
    (1, {"small": {**mdt.TILES["small"], "BD": 16, "warps2": 2}}),
    (1, {"small": {**mdt.TILES["small"], "warps3": 2}}),
]


def _shape() -> dict:
    return SMOKE_SHAPE if SMOKE else SHAPE


def block_args(batch: int, dtype: torch.dtype, stream: str = "res+ssq", seed: int = 0,
               dims: dict | None = None) -> dict:
    """Random block weights (the layer's init scales), states and stream on the device."""
    d = dims or _shape()
    dm, di, n, r, w = d["d_model"], d["d_inner"], d["d_state"], d["dt_rank"], d["width"]
    gen = torch.Generator(device=DEV).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=DEV)  # noqa: E731
    args = dict(
        conv_state=rnd(batch, di, w - 1).to(dtype), ssm_state=rnd(batch, di, n),
        x=rnd(batch, dm).to(dtype), residual=2 * rnd(batch, dm),
        norm_weight=(1 + 0.2 * rnd(dm)).to(dtype), norm_eps=1e-5,
        in_proj_weight=(rnd(2 * di, dm) / dm**0.5).to(dtype), conv_weight=(rnd(di, w) / 2).to(dtype),
        conv_bias=(0.1 * rnd(di)).to(dtype), x_proj_weight=(rnd(r + 2 * n, di) / di**0.5).to(dtype),
        dt_proj_weight=(rnd(di, r) / r**0.5).to(dtype), dt_bias=0.5 * rnd(di) - 2,
        A=-torch.exp(0.5 * rnd(di, n)), D=rnd(di), out_proj_weight=(rnd(dm, di) / di**0.5).to(dtype),
        residual_dtype=torch.float32)
    return _with_stream(args, stream)


def _with_stream(args: dict, stream: str) -> dict:
    """One form of the stream: "x+res", "x" (no residual yet) or "res+ssq" (the previous block was
    fused: the residual holds its output, with 2 partial sums of squares)."""
    if stream == "x":
        args["residual"] = None
    elif stream == "res+ssq":
        args["x"] = None
        sq = args["residual"].square().sum(-1)
        args["residual_sumsq"] = torch.stack([0.5 * sq, 0.5 * sq])
    return args


def _copy(args: dict, dtype: torch.dtype | None = None) -> dict:
    out = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v.clone())
           if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    if dtype is not None:
        out["residual_dtype"] = dtype
    return out


def _stream(args: dict) -> torch.Tensor:
    x, res = args["x"], args["residual"]
    if x is None:
        return res.double()
    return x.double() if res is None else x.double() + res.double()


def _run(op, op_name: str, backend: str, args: dict) -> dict:
    """Outputs of one block step: the block's output (new stream - stream), row sums of squares, states."""
    args = _copy(args)
    with forced_backend(backend, op_name):
        res_out, sumsq = op(**args)
    return {"delta": res_out.double() - _stream(args), "sumsq": sumsq.double().sum(0),
            "conv_state": args["conv_state"], "ssm_state": args["ssm_state"], "res_out": res_out}


def run_block(backend: str, args: dict) -> dict:
    """The Mamba-1 block step's outputs (:func:`_run`)."""
    return _run(mamba1_decode_block, OP, backend, args)


def block_args2(batch: int, dtype: torch.dtype, stream: str = "res+ssq", seed: int = 0) -> dict:
    """Random Mamba-2 block weights (the layer's init scales), states and stream on the device."""
    d = SMOKE_SHAPE2 if SMOKE else SHAPE2
    dm, h, p, n, g, w = d["d_model"], d["nheads"], d["headdim"], d["d_state"], d["ngroups"], d["width"]
    di = h * p
    cd = di + 2 * g * n
    gen = torch.Generator(device=DEV).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=DEV)  # noqa: E731
    args = dict(
        conv_state=rnd(batch, cd, w - 1).to(dtype), ssm_state=rnd(batch, h, p, n),
        x=rnd(batch, dm).to(dtype), residual=2 * rnd(batch, dm),
        norm_weight=(1 + 0.2 * rnd(dm)).to(dtype), norm_eps=1e-5,
        in_proj_weight=(rnd(di + cd + h, dm) / dm**0.5).to(dtype), conv_weight=(rnd(cd, w) / 2).to(dtype),
        conv_bias=(0.1 * rnd(cd)).to(dtype), dt_bias=0.5 * rnd(h) - 2, A=-torch.exp(0.5 * rnd(h) + 1),
        D=rnd(h), dt_limit=(0.0, math.inf), gate_norm_weight=(1 + 0.2 * rnd(di)).to(dtype), gate_norm_eps=1e-5,
        out_proj_weight=(rnd(dm, di) / di**0.5).to(dtype), residual_dtype=torch.float32)
    return _with_stream(args, stream)


def run_block2(backend: str, args: dict) -> dict:
    """The Mamba-2 block step's outputs (:func:`_run`)."""
    return _run(mamba2_decode_block, OP2, backend, args)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------

BLOCK_KEYS = ("delta", "sumsq", "conv_state", "ssm_state")


def _block_row(label: str, run, args: dict, shape: tuple, dtype: torch.dtype) -> dict:
    """Ours (``run("triton", args)``) and the op-by-op step against the op-by-op step in float64: ours
    passes within 3x the op-by-op step's own bf16 error (1e-5 in fp32)."""
    ours, op_by_op = run("triton", args), run("reference", args)
    truth = run("reference", _copy(args, torch.float64))
    err = max(rel(ours[k], truth[k]) for k in BLOCK_KEYS)
    base = max(rel(op_by_op[k], truth[k]) for k in BLOCK_KEYS)
    vs_op = max(rel(ours[k], op_by_op[k]) for k in BLOCK_KEYS)
    tol = 3 * base + 1e-4 if dtype == torch.bfloat16 else 1e-5
    return check_row(label, shape, dtype, err, None, tol,
                     note=f"op-by-op vs f64 {base:.1e}; ours vs op-by-op {vs_op:.1e}")


def _rerun_row(label: str, run, args: dict, batch: int) -> dict:
    first, second = run("triton", args), run("triton", args)
    same = all(torch.equal(first[k], second[k]) for k in first)
    return check_row(label, (batch,), torch.bfloat16, 0.0 if same else math.inf, None, 0.0)


def _streams(batch: int) -> tuple[str, ...]:
    return ("x+res", "x", "res+ssq") if batch in (1, 64) else ("res+ssq",)


def _block_checks() -> list[dict]:
    rows = []
    for dtype, batches in ((torch.bfloat16, BATCHES), (torch.float32, (1, 64))):
        for batch in batches:
            for stream in _streams(batch):
                rows.append(_block_row(f"block step vs f64 ({stream})", run_block,
                                       block_args(batch, dtype, stream, seed=batch), (batch, *_shape().values()),
                                       dtype))
    rows.append(_rerun_row("block step re-run bit-identical", run_block,
                           block_args(64, torch.bfloat16, "x+res", seed=9), 64))
    return rows


def _m2_block_checks() -> list[dict]:
    rows = []
    shape = tuple((SMOKE_SHAPE2 if SMOKE else SHAPE2).values())
    for dtype in (torch.bfloat16, torch.float32):
        for batch in BATCHES2:
            for stream in _streams(batch):
                rows.append(_block_row(f"mamba2 block step vs f64 ({stream})", run_block2,
                                       block_args2(batch, dtype, stream, seed=batch), (batch, *shape), dtype))
    for batch in (1, 64):
        rows.append(_rerun_row("mamba2 block step re-run bit-identical", run_block2,
                               block_args2(batch, torch.bfloat16, "x+res", seed=9), batch))
    return rows


def _logits_args(batch: int, dtype: torch.dtype, stream: str, seed: int = 0) -> dict:
    """The end of a mamba1-130m step: stream [B, 768], final norm, LM head [50280, 768], 50277 logits."""
    dm = _shape()["d_model"]
    vocab, padded = (50277, 50280) if not SMOKE else (83, 96)
    gen = torch.Generator(device=DEV).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=DEV)  # noqa: E731
    return dict(x=rnd(batch, dm).to(dtype) if stream != "res" else None,
                residual=3 * rnd(batch, dm) if stream != "x" else None, norm_weight=(1 + 0.2 * rnd(dm)).to(dtype),
                norm_eps=1e-5, lm_head_weight=(rnd(padded, dm) / dm**0.5).to(dtype), vocab_size=vocab,
                residual_dtype=torch.float32)


def _logits(backend: str, args: dict) -> torch.Tensor:
    with forced_backend(backend, OP_LOGITS):
        return decode_logits(**args)


def _logits_checks() -> list[dict]:
    """decode_logits (one kernel) against the op-by-op end in float64, next to the op-by-op bf16 end."""
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for batch, stream in ((1, "res"), (1, "x+res"), (3, "res"), (4, "x")):
            args = _logits_args(batch, dtype, stream, seed=batch)
            ours, low = _logits("triton", args), _logits("reference", args)
            truth = _logits("reference", {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
                            | {"residual_dtype": torch.float64})
            err, base = rel(ours, truth), rel(low, truth)
            same_argmax = bool((ours.argmax(-1) == low.argmax(-1)).all())
            tol = 3 * base + 1e-4 if dtype == torch.bfloat16 else 1e-5
            row = check_row(f"decode_logits vs f64 ({stream})", (batch, _shape()["d_model"], args["vocab_size"]),
                            dtype, err, None, tol, note=f"op-by-op vs f64 {base:.1e}; argmax equal: {same_argmax}")
            rows.append(row)
    return rows


def _large_check() -> list[dict]:
    """64-bit offsets: the SSM state of LARGE_BATCH rows passes 2^31 elements; rows at both ends."""
    if SMOKE:
        return []
    d = SHAPE
    need = LARGE_BATCH * d["d_inner"] * (d["d_state"] * 4 + (d["width"] - 1) * 2 + 3 * 2) * 1.3
    free, _ = torch.cuda.mem_get_info()
    if need > 0.8 * free:
        return [check_row("2^31 state elements", (LARGE_BATCH,), torch.bfloat16, None, None, 0,
                          note=f"skipped: needs {need / 2**30:.0f} GiB")]
    args = block_args(LARGE_BATCH, torch.bfloat16, "x+res", seed=11)
    assert args["ssm_state"].numel() > 2**31
    picks = torch.tensor([0, 1, LARGE_BATCH - 2, LARGE_BATCH - 1], device=DEV)
    small = {k: (v[picks].clone() if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == LARGE_BATCH
                 else v) for k, v in args.items()}
    ours = run_block("triton", args)
    del args
    ref = run_block("reference", small)
    err = max(rel(ours[k][picks], ref[k]) for k in ("conv_state", "ssm_state", "res_out"))
    del ours
    torch.cuda.empty_cache()
    return [check_row("2^31 state elements (end rows)", (LARGE_BATCH, *SHAPE.values()), torch.bfloat16, err,
                      None, 2e-2)]


_MODELS: dict = {}


def build_model(family: str = "mamba1"):
    """A random-init {family}-130m in bfloat16 ({family}-tiny in float32 for --cpu-smoke), built once."""
    from core.backbone import CausalLM
    from core.presets import get_preset

    key = (DEV, SMOKE, family)
    if key not in _MODELS:
        torch.manual_seed(0)
        preset = get_preset(f"{family}-tiny") if SMOKE else get_preset(f"{family}-130m")
        dtype = torch.float32 if SMOKE else torch.bfloat16
        with torch.device(DEV):  # initialized on the device: seconds less on the GPU machine
            _MODELS[key] = CausalLM(preset).to(dtype).eval()
    return _MODELS[key]


@contextlib.contextmanager
def _step_path(backend: str):
    """decode_step with the fused block steps (backend "triton"; the Mamba-2 one switched on through
    SSM_SUITE_FUSED_MAMBA2_DECODE=1) or the op-by-op ones ("reference"), at every batch size
    (decode_step's batch limits for the fused steps lifted)."""
    import core.cuda_graph as cuda_graph

    limits = cuda_graph.FUSED_MAMBA1_MAX_BATCH, cuda_graph.FUSED_MAMBA2_MAX_BATCH
    env = os.environ.get(FUSED_MAMBA2_ENV)
    cuda_graph.FUSED_MAMBA1_MAX_BATCH = cuda_graph.FUSED_MAMBA2_MAX_BATCH = None
    os.environ[FUSED_MAMBA2_ENV] = "1" if backend == "triton" else "0"
    try:
        with (forced_backend(backend, OP), forced_backend(backend, OP2), forced_backend(backend, OP_SCAN),
              forced_backend(backend, OP_LOGITS)):
            yield
    finally:
        cuda_graph.FUSED_MAMBA1_MAX_BATCH, cuda_graph.FUSED_MAMBA2_MAX_BATCH = limits
        if env is None:
            os.environ.pop(FUSED_MAMBA2_ENV, None)
        else:
            os.environ[FUSED_MAMBA2_ENV] = env


@contextlib.contextmanager
def _pdl(on: bool):
    """Programmatic dependent launch in the fused kernels on or off (kernels/pdl.py: SSM_SUITE_PDL)."""
    old = os.environ.get(PDL_ENV)
    os.environ[PDL_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PDL_ENV, None)
        else:
            os.environ[PDL_ENV] = old


class _Runner:
    """A CUDAGraphRunner captured (or, under --cpu-smoke, run eagerly) and stepped inside ``setting()``, a
    context manager that picks the step's path."""

    def __init__(self, model, batch: int, length: int, setting: Callable[[], contextlib.AbstractContextManager],
                 ssm_state_dtype: torch.dtype | None = None):
        from core.cuda_graph import CUDAGraphRunner

        self.setting, self.batch_size = setting, batch
        with setting():
            self.runner = CUDAGraphRunner(model, batch, length, capture=not SMOKE, ssm_state_dtype=ssm_state_dtype)

    def begin(self, length: int):
        return self.runner.begin(length)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        with self.setting():
            return self.runner.step(token)


def _runner(model, batch: int, length: int, fused: bool, pdl: bool = True) -> _Runner:
    """The fused block steps or the op-by-op ones (``_step_path``); ``pdl`` False: the fused kernels
    without PDL."""
    @contextlib.contextmanager
    def setting():
        with _step_path("triton" if fused else "reference"), _pdl(pdl):
            yield
    return _Runner(model, batch, length, setting)


def _prefill(model, runner, batch: int, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator(device=DEV).manual_seed(seed)
    ids = torch.randint(0, min(1000, model.config.vocab_size), (batch, 16), device=DEV, generator=gen)
    with torch.no_grad():
        return model(ids, cache=runner.begin(ids.shape[1] + STEPS + 2), num_last_tokens=1).logits[:, -1]


def _model_checks(family: str = "mamba1") -> list[dict]:
    from core.cuda_graph import decode_step_path

    rows = []
    model = build_model(family)
    steps = 8 if SMOKE else STEPS
    for batch in ((2,) if SMOKE else (1, 64)):
        fused, plain = _runner(model, batch, 16 + steps + 2, True), _runner(model, batch, 16 + steps + 2, False)
        # Greedy with the op-by-op step; then both steps teacher-forced on its tokens.
        logits = _prefill(model, plain, batch)
        _prefill(model, fused, batch)
        tokens = []
        for _ in range(steps):
            token = logits.argmax(-1)
            tokens.append(token)
            logits = plain.step(token).clone()
        _prefill(model, plain, batch)
        errs, agree, ties, untied = [], 0, 0, 0
        for token in tokens:
            a, b = fused.step(token).clone(), plain.step(token).clone()
            errs.append(rel(a, b))
            top2 = b.topk(2, dim=-1).values
            same = a.argmax(-1) == b.argmax(-1)
            agree += int(same.sum())
            near_tie = (top2[:, 0] - top2[:, 1]) < TIE
            ties += int((~same & near_tie).sum())
            untied += int((~same & ~near_tie).sum())
        total = batch * steps
        dtype = next(model.parameters()).dtype
        with _step_path("triton"):
            path = decode_step_path(model, batch)
        if "fused" not in path:  # the fused step would not run: the comparison would be vacuous
            errs = [math.inf]
        rows.append(check_row(f"{family}-130m {steps} steps, fused vs op-by-op logits", (batch,), dtype,
                              max(errs), None, 2e-2,
                              note=f"mean {sum(errs) / len(errs):.1e}; argmax equal {agree}/{total}, differing at "
                                   f"near-ties {ties}, elsewhere {untied}; fused path: {path}"))
        rows.append(check_row(f"greedy tokens equal except at near-ties (< {TIE})", (batch,), dtype,
                              float(untied), None, 0.0))
        del fused, plain
    return rows


def _scan_runner(model, batch: int, length: int, backend: str) -> _Runner:
    """decode_step's own choices (fused blocks up to 4 rows, op by op above), mamba1_scan_step on ``backend``."""
    return _Runner(model, batch, length, lambda: forced_backend(backend, OP_SCAN))


def _step_comparison(model, batch: int, steps: int, new: _Runner, old: _Runner, what: str, path: str = ""):
    """Teacher-forced on ``old``'s greedy tokens: ``new``'s logits against ``old``'s (a check row, failed by
    a greedy token that differs away from a near-tie; ``path`` "vacuous" fails it outright), and both
    steps' times (a timing row)."""
    logits = _prefill(model, old, batch)
    _prefill(model, new, batch)
    errs, untied = [], 0
    for _ in range(steps):
        token = logits.argmax(-1)
        a, logits = new.step(token).clone(), old.step(token).clone()
        errs.append(rel(a, logits))
        top2 = logits.topk(2, dim=-1).values
        untied += int(((a.argmax(-1) != logits.argmax(-1)) & ((top2[:, 0] - top2[:, 1]) >= TIE)).sum())
    row = check_row(f"mamba1-130m {steps} steps, {what}", (batch,), next(model.parameters()).dtype,
                    math.inf if path == "vacuous" else max(errs), None, 2e-2,
                    note=f"greedy tokens differing away from near-ties: {untied}" + (f"; path: {path}" if path else ""))
    row["pass"] = row["pass"] and untied == 0
    time_row = {"kernel": f"mamba1 decode step, {len(model.backbone.layers)} blocks ({what})", "shape": f"batch {batch}",
                "ours_fwd_ms": _time_replays(new), "baseline_fwd_ms": _time_replays(old), "ours_fwdbwd_ms": None,
                "mamba_ssm_fwd_ms": None, "bytes_fwd": nbytes(*model.parameters())}
    return row, time_row


def _scan_step_rows(batches=(16, 64)):
    """mamba1-130m at batches past the fused block step: the op-by-op step with dt_proj inside the scan
    kernel (the default) against dt_proj as its own matmul: teacher-forced logits, then the step time."""
    model = build_model()
    rows, times = [], []
    steps = 8 if SMOKE else 32
    for batch in ((6,) if SMOKE else batches):
        new = _scan_runner(model, batch, 16 + steps + 2, "triton")
        old = _scan_runner(model, batch, 16 + steps + 2, "reference")
        row, time_row = _step_comparison(model, batch, steps, new, old, "dt_proj in the scan vs its own matmul")
        rows.append(row)
        times.append(time_row)
        del new, old
    return rows, times


# Tile settings of the scan-step kernel (mamba1_scan_step: the op-by-op step's tail past batch 4) that
# --scan-step times at batch 64: TILES["large"] overrides.
SCAN_SWEEP = [
    {"BB2": 16, "BD": 16},
    {"BB2": 32, "BD": 16},
    {"BB2": 8, "BD": 32},
    {"BB2": 4, "BD": 32},
    {"BB2": 8, "BD": 16},
]


def _scan_sweep_rows(batch: int = 64):
    """Yields one row per SCAN_SWEEP setting: the step time of decode_step's default path at ``batch``,
    after checking the setting's scan-step output against the default tiles' on real-shape inputs."""
    from kernels.mamba_decode import mamba1_scan_step

    model = build_model()
    batch = batch if not SMOKE else 6
    d = _shape()
    gen = torch.Generator(device=DEV).manual_seed(12)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=DEV)  # noqa: E731
    dtype = torch.bfloat16 if not SMOKE else torch.float32
    di, n, r = d["d_inner"], d["d_state"], d["dt_rank"]
    inputs = dict(x=rnd(batch, di).to(dtype), z=rnd(batch, di).to(dtype), x_dbl=rnd(batch, r + 2 * n).to(dtype),
                  dt_proj_weight=(rnd(di, r) / r**0.5).to(dtype), dt_bias=0.5 * rnd(di) - 2,
                  A=-torch.exp(0.5 * rnd(di, n)), D=rnd(di))
    state = rnd(batch, di, n)

    def scan():
        s = state.clone()
        with forced_backend("triton", OP_SCAN):
            return mamba1_scan_step(s, **inputs), s

    want = scan()
    default = dict(mdt.TILES)
    for override in [{}] + SCAN_SWEEP:
        mdt.TILES = {**default, "large": {**default["large"], **override}}
        try:
            got = scan()
            err = max(rel(got[0], want[0].double()), rel(got[1], want[1].double()))
            runner = _scan_runner(model, batch, 64, "triton")
            _prefill(model, runner, batch)
            ms = _time_replays(runner)
            del runner
        finally:
            mdt.TILES = default
        yield {"kernel": f"scan-step tiles {override or 'default'}", "shape": f"batch {batch}", "ours_fwd_ms": ms,
               "note": f"vs default tiles {err:.1e}"}


def _split_k_kernel_rows() -> list[dict]:
    """linear_partials, add_norm_partials and conv_step_partials (triton) against their float64 references at
    the step's shapes (x_proj, out_proj and in_proj of mamba1-130m at batch 64) and at odd ones; the sum of
    the partials against F.linear in the weights' dtype; bit-identical re-runs."""
    from kernels.mamba_decode import add_norm_partials, conv_step_partials, linear_partials
    from kernels.mamba_decode.reference import (add_norm_partials_reference, conv_step_partials_reference,
                                                linear_partials_reference, sum_partials)

    gen = torch.Generator(device=DEV).manual_seed(21)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=DEV)  # noqa: E731
    rows = []
    shapes = [(64, 80, 1536, 8), (64, 768, 1536, 4), (64, 3072, 768, 2), (37, 100, 1000, 3), (5, 33, 70, 2)]
    for m, n, k, splits in (shapes[3:] if SMOKE else shapes):
        for dtype in ((torch.float32,) if SMOKE else (torch.bfloat16, torch.float32)):
            x, w = rnd(m, k).to(dtype), (rnd(n, k) / k**0.5).to(dtype)
            with forced_backend("triton", OP_PARTIALS):
                got = linear_partials(x, w, splits)
                again = linear_partials(x, w, splits)
            want = linear_partials_reference(x.double(), w.double(), splits)
            err = max(rel(got[s], want[s]) for s in range(splits))
            linear = rel(sum_partials(got, dtype), torch.nn.functional.linear(x.double(), w.double()))
            rows.append(check_row("linear_partials vs float64, each partial", (m, n, k, splits), dtype, err, None,
                                  1e-2 if dtype != torch.float32 else 1e-5,
                                  note=f"sum rounded vs F.linear {linear:.1e}; re-run bit-identical "
                                       f"{torch.equal(got, again)}"))
            rows[-1]["pass"] = rows[-1]["pass"] and torch.equal(got, again)
    for batch, dim, splits in ((64, 768, 4), (7, 100, 3)):
        parts, res, nw = rnd(splits, batch, dim), rnd(batch, dim), rnd(dim).abs() + 0.5
        for dtype in ((torch.float32,) if SMOKE else (torch.bfloat16, torch.float32)):
            with forced_backend("triton", OP_ADD_NORM):
                h, r = add_norm_partials(parts, res, nw.to(dtype), 1e-5, dtype, torch.float32)
            wh, wr = add_norm_partials_reference(parts.double(), res.double(), nw.to(dtype).double(), 1e-5,
                                                 torch.float64, torch.float64)
            rows.append(check_row("add_norm_partials vs float64 (h; residual)", (splits, batch, dim), dtype,
                                  max(rel(h, wh), rel(r, wr)), None, 1e-2 if dtype != torch.float32 else 1e-5))
    for batch, d_inner, width, splits in ((64, 1536, 4, 2), (5, 100, 3, 3)):
        parts, state = rnd(splits, batch, 2 * d_inner), rnd(batch, d_inner, width - 1)
        weight, bias = rnd(d_inner, width) / width, rnd(d_inner)
        for dtype in ((torch.float32,) if SMOKE else (torch.bfloat16, torch.float32)):
            got_state, want_state = state.to(dtype), state.double()
            with forced_backend("triton", OP_CONV):
                xc, z = conv_step_partials(parts, got_state, weight.to(dtype), bias.to(dtype), dtype)
            wx, wz = conv_step_partials_reference(parts.double(), want_state, weight.to(dtype).double(),
                                                  bias.to(dtype).double(), torch.float64)
            rows.append(check_row("conv_step_partials vs float64 (xc; z; conv state)", (splits, batch, d_inner, width),
                                  dtype, max(rel(xc, wx), rel(z, wz), rel(got_state, want_state)), None,
                                  1e-2 if dtype != torch.float32 else 1e-5))
    return rows


@contextlib.contextmanager
def _split_k_on():
    """The split-K ops on their triton backend (the default on CUDA; the interpreter under --cpu-smoke)."""
    with forced_backend("triton", OP_PARTIALS), forced_backend("triton", OP_ADD_NORM), forced_backend("triton", OP_CONV):
        yield


def _path_rows(rows: list[dict], times: list[dict], on: Callable, off: Callable, what: str, marker: str,
               batches=(16, 64), state_dtypes=(None,)) -> tuple[list[dict], list[dict]]:
    """mamba1-130m at batches past the fused block step: decode_step's default path inside ``on()`` against
    the path inside ``off()`` (an op forced to its reference backend, which turns the new path off):
    teacher-forced logits and step times, appended to ``rows`` and ``times``, for each batch and SSM state
    dtype (None: float32). The check fails when the step path does not name ``marker`` (the new path did
    not run)."""
    from core.cuda_graph import decode_step_path

    model = build_model()
    steps = 8 if SMOKE else 32
    for batch, state_dtype in [(b, d) for b in ((6,) if SMOKE else batches) for d in state_dtypes]:
        new = _Runner(model, batch, 16 + steps + 2, on, state_dtype)
        old = _Runner(model, batch, 16 + steps + 2, off, state_dtype)
        with on():
            path = decode_step_path(model, batch, state_dtype)
        label = what if state_dtype is None else f"{what}, {str(state_dtype).removeprefix('torch.')} states"
        row, time_row = _step_comparison(model, batch, steps, new, old, label, path if marker in path else "vacuous")
        rows.append(row)
        times.append(time_row)
        del new, old
    return rows, times


def _split_k_rows():
    """The split-K matmuls (x_proj, out_proj and in_proj as partials where linear_partials runs on triton)
    against cuBLAS's: the kernels, then the step."""
    return _path_rows(_split_k_kernel_rows(), [], _split_k_on, lambda: forced_backend("reference", OP_PARTIALS),
                      "split-K matmuls vs cuBLAS", "split-K", state_dtypes=(None, torch.bfloat16))


# TILES overrides of kernels/mamba_decode/triton_splitk.py that --split-k times at batch 64.
SPLIT_SWEEP = [
    {"min_slice": 192},
    {"programs": 48},
    {"programs": 192},
    {"max_stages": 4},
]


def _split_sweep_rows(batch: int = 64):
    """Yields the step time of decode_step's default path at ``batch`` under each SPLIT_SWEEP setting."""
    import kernels.mamba_decode.triton_splitk as splitk

    model = build_model()
    batch = batch if not SMOKE else 6
    default = dict(splitk.TILES)
    for override in [{}] + SPLIT_SWEEP:
        splitk.TILES = {**default, **override}
        try:
            runner = _Runner(model, batch, 64, _split_k_on)
            _prefill(model, runner, batch)
            ms = _time_replays(runner)
            del runner
        finally:
            splitk.TILES = default
        yield {"kernel": f"split-K tiles {override or 'default'}", "shape": f"batch {batch}", "ours_fwd_ms": ms}


def _head_kernel_rows() -> tuple[list[dict], list[dict]]:
    """lm_head_logits (triton) at mamba1-130m's LM head (50280 x 768) and at odd shapes: its logits against
    cuBLAS's F.linear in the weights' dtype (16-bit logits differ by one spacing of the dtype at most, from
    another order of float32 additions before the rounding), its greedy pick against torch.argmax of its
    own logits (exactly) and of cuBLAS's (away from near-ties); bit-identical re-runs. Then its time against cuBLAS + float32 copy +
    torch.argmax."""
    from kernels.mamba_decode import lm_head_logits

    gen = torch.Generator(device=DEV).manual_seed(31)
    rows, times = [], []
    shapes = [(64, 50280, 50280, 768), (16, 50280, 50280, 768), (37, 1000, 1024, 200), (5, 50277, 50280, 768)]
    for batch, vocab, padded, d_model in (shapes[2:3] if SMOKE else shapes):
        for dtype in ((torch.float32,) if SMOKE else (torch.bfloat16, torch.float32)):
            hidden = torch.randn(batch, d_model, generator=gen, device=DEV).to(dtype)
            weight = (torch.randn(padded, d_model, generator=gen, device=DEV) / d_model**0.5).to(dtype)
            greedy, again_greedy = (torch.full((batch,), -1, dtype=torch.long, device=DEV) for _ in range(2))
            with forced_backend("triton", OP_HEAD):
                got = lm_head_logits(hidden, weight, vocab, greedy)
                again = lm_head_logits(hidden, weight, vocab, again_greedy)
            want = torch.nn.functional.linear(hidden, weight)[:, :vocab].float()
            spacing = torch.finfo(dtype).eps * want.abs().clamp_min(torch.finfo(dtype).tiny)
            ulps = ((got - want).abs() / spacing).max().item() if dtype != torch.float32 else 0.0
            top2 = want.topk(2, dim=-1).values
            untied = int(((greedy != want.argmax(-1)) & ((top2[:, 0] - top2[:, 1]) >= TIE)).sum())
            own = torch.equal(greedy, got.argmax(-1))
            same = torch.equal(got, again) and torch.equal(greedy, again_greedy)
            row = check_row("lm_head_logits vs cuBLAS F.linear", (batch, vocab, padded, d_model), dtype,
                            rel(got, want), None, 1e-2 if dtype != torch.float32 else 1e-5,
                            note=f"max diff {ulps:.2f} x eps*|logit| (16-bit); pick = argmax of its logits {own}; "
                                 f"picks "
                                 f"differing from cuBLAS's away from near-ties {untied}; re-run bit-identical {same}")
            row["pass"] = row["pass"] and own and same and untied == 0 and ulps <= 1.0
            rows.append(row)
            if d_model == 768 and dtype == torch.bfloat16:
                out = torch.empty(batch, dtype=torch.long, device=DEV)

                def ours():
                    with forced_backend("triton", OP_HEAD):
                        lm_head_logits(hidden, weight, vocab, out)

                def cublas():
                    torch.argmax(torch.nn.functional.linear(hidden, weight)[:, :vocab].float(), dim=-1, out=out)
                times.append({"kernel": "LM head + float32 logits + greedy pick", "shape": f"batch {batch}",
                              "ours_fwd_ms": _timed(ours), "baseline_fwd_ms": _timed(cublas)})
    return rows, times


def _head_on():
    """lm_head_logits on its triton backend (the default on CUDA; the interpreter under --cpu-smoke)."""
    return forced_backend("triton", OP_HEAD)


def _head_rows():
    """The step's end as lm_head_logits' kernels against the cuBLAS LM head + float32 copy + torch.argmax:
    the kernels, then the step."""
    return _path_rows(*_head_kernel_rows(), _head_on, lambda: forced_backend("reference", OP_HEAD),
                      "LM head kernels vs cuBLAS + argmax", "greedy pick")


# TILES overrides of kernels/mamba_decode/triton_head.py that --head times at batch 64 (whole steps).
HEAD_SWEEP = [
    {"prefetch": 0},
    {"prefetch": 256},
    {"prefetch": 768},  # whole rows: ~65 us against ~43 alone (L2 thrashed: 77 MB of weights, 50 MB of L2)
    {"BN": 64},
    {"BN": 64, "BK": 128, "stages": 3},
    {"BK": 128, "stages": 3},
    {"warps": 8},
]


def _head_sweep_rows(batch: int = 64):
    """Yields the step time of decode_step's default path at ``batch`` under each HEAD_SWEEP setting,
    with its logits against the default tiles'."""
    import kernels.mamba_decode.triton_head as head

    model = build_model()
    batch = batch if not SMOKE else 6
    default = dict(head.TILES)
    base = None
    for override in [{}] + HEAD_SWEEP:
        head.TILES = {**default, **override}
        try:
            runner = _Runner(model, batch, 64, _head_on)
            _prefill(model, runner, batch)
            logits = runner.step(torch.arange(batch, device=DEV)).clone()
            base = logits if base is None else base
            ms = _time_replays(runner)
            del runner
        finally:
            head.TILES = default
        yield {"kernel": f"head tiles {override or 'default'}", "shape": f"batch {batch}", "ours_fwd_ms": ms,
               "note": f"logits vs default tiles {rel(logits, base):.1e}"}


def _m2_model_checks() -> list[dict]:
    return _model_checks("mamba2")


def run_checks() -> list[dict]:
    return (_block_checks() + _large_check() + _logits_checks() + _model_checks() + _m2_block_checks()
            + _m2_model_checks())


# --------------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------------

def _time_replays(runner, reps: int = 200) -> float:
    """Milliseconds per step: median of 5 runs of ``reps`` graph replays (one token fed back)."""
    if SMOKE:
        start = time.perf_counter()
        runner.step(torch.zeros(runner.batch_size, dtype=torch.long, device=DEV))
        return (time.perf_counter() - start) * 1e3
    runner = runner.runner
    runner.input_ids.zero_()
    for _ in range(10):
        runner.graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            runner.graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[2]


def _block_bytes(args: dict) -> int:
    weights = [args[k] for k in ("in_proj_weight", "conv_weight", "x_proj_weight", "dt_proj_weight",
                                 "out_proj_weight", "norm_weight", "gate_norm_weight") if k in args]
    states = [args["conv_state"], args["ssm_state"]]
    return nbytes(*weights) + 2 * nbytes(*states)


def _block_ms(backend: str, args: dict, pdl: bool = True) -> float | None:
    mamba2 = "gate_norm_weight" in args

    def go():
        with forced_backend(backend, OP2 if mamba2 else OP), _pdl(pdl):
            (mamba2_decode_block if mamba2 else mamba1_decode_block)(**args)
    if SMOKE:
        start = time.perf_counter()
        go()
        return (time.perf_counter() - start) * 1e3
    return graph_ms(go)


def _timed(fn) -> float:
    """ms of one call, from a CUDA graph (wall time of one call under --cpu-smoke)."""
    if SMOKE:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return graph_ms(fn)


def _bench_rows(batches=(1, 64), family: str = "mamba1"):
    """Yields the benchmark rows (a generator, so that a caller prints each as it comes)."""
    model = build_model(family)
    n_layers = len(model.backbone.layers)
    for batch in ((2,) if SMOKE else batches):
        times = {}
        for fused, pdl in ((True, True), (True, False), (False, True)):
            runner = _runner(model, batch, 64, fused, pdl)
            _prefill(model, runner, batch)
            times[fused, pdl] = _time_replays(runner)
            del runner
        yield {"kernel": f"{family} decode step, {n_layers} blocks (fused / op-by-op)", "shape": f"batch {batch}",
               "ours_fwd_ms": times[True, True], "baseline_fwd_ms": times[False, True], "ours_fwdbwd_ms": None,
               "mamba_ssm_fwd_ms": None, "bytes_fwd": nbytes(*model.parameters())}
        yield {"kernel": f"{family} decode step, {n_layers} blocks (fused with PDL / without)",
               "shape": f"batch {batch}", "ours_fwd_ms": times[True, True], "baseline_fwd_ms": times[True, False],
               "ours_fwdbwd_ms": None, "mamba_ssm_fwd_ms": None, "bytes_fwd": nbytes(*model.parameters())}
        if family == "mamba1" and batch <= 4:
            largs = _logits_args(batch, torch.bfloat16 if not SMOKE else torch.float32, "res")
            yield {"kernel": "step end: final norm + LM head + float logits (one kernel / op by op)",
                   "shape": f"batch {batch}", "ours_fwd_ms": _timed(lambda: _logits("triton", largs)),
                   "baseline_fwd_ms": _timed(lambda: _logits("reference", largs)), "ours_fwdbwd_ms": None,
                   "mamba_ssm_fwd_ms": None, "bytes_fwd": nbytes(largs["lm_head_weight"])}
        make = block_args2 if family == "mamba2" else block_args
        args = make(batch, torch.bfloat16 if not SMOKE else torch.float32, "res+ssq")
        yield {"kernel": f"one {family} block step (fused / op-by-op)", "shape": f"batch {batch}",
               "ours_fwd_ms": (fused_ms := _block_ms("triton", args)), "baseline_fwd_ms": _block_ms("reference", args),
               "ours_fwdbwd_ms": None, "mamba_ssm_fwd_ms": None, "bytes_fwd": _block_bytes(args)}
        yield {"kernel": f"one {family} block step (fused with PDL / without)", "shape": f"batch {batch}",
               "ours_fwd_ms": fused_ms, "baseline_fwd_ms": _block_ms("triton", args, pdl=False),
               "ours_fwdbwd_ms": None, "mamba_ssm_fwd_ms": None, "bytes_fwd": _block_bytes(args)}


def _sweep_rows(deadline: float | None):
    """Yields one row per SWEEP setting: its step time, after checking it against the default tiles."""
    model = build_model()
    default = dict(mdt.TILES)
    for batch, override in SWEEP:
        if deadline is not None and time.time() > deadline:
            yield {"kernel": f"sweep {override}", "shape": f"batch {batch}", "note": "skipped (budget)"}
            continue
        args = block_args(batch if not SMOKE else 2, torch.bfloat16 if not SMOKE else torch.float32, "x+res", seed=5)
        want = run_block("triton", args)
        mdt.TILES = {**default, **override}
        try:
            got = run_block("triton", args)
            err = max(rel(got[k], want[k]) for k in ("delta", "conv_state", "ssm_state"))
            runner = _runner(model, batch if not SMOKE else 2, 64, True)
            _prefill(model, runner, runner.batch_size)
            ms = _time_replays(runner)
            del runner
        finally:
            mdt.TILES = default
        changed = {k: v for group, tiles in override.items() for k, v in tiles.items() if default[group].get(k) != v}
        yield {"kernel": f"sweep {changed}", "shape": f"batch {batch}", "ours_fwd_ms": ms,
               "ours_fwdbwd_ms": None, "mamba_ssm_fwd_ms": None, "note": f"vs default tiles {err:.1e}"}


def run_bench(sweep: bool = False, deadline: float | None = None) -> list[dict]:
    rows = list(_bench_rows()) + list(_bench_rows(family="mamba2"))
    if sweep:
        rows += list(_sweep_rows(deadline))
    return rows


def precompile(checks: bool = True, sweep: bool = False) -> float:
    """Compile the kernels of the checks and the benchmark in parallel threads (every Triton launch inside
    only compiles, for the same specializations); returns the seconds spent."""
    start = time.time()
    model = build_model()
    from core.cuda_graph import decode_step

    def steps(model, batches, backends=("triton", "reference")):
        for batch in batches:
            for backend in backends:
                cache = model.allocate_cache(batch, 8)
                with _step_path(backend):
                    decode_step(model, torch.zeros(batch, dtype=torch.long, device=DEV), cache)

    def blocks(batches, make_args, run):  # the block checks' calls: each dtype and stream form
        for batch in batches:
            for dtype in (torch.bfloat16, torch.float32):
                for stream in ("x+res", "x", "res+ssq"):
                    args = make_args(batch, dtype, stream)
                    run("triton", args)
                    run("reference", args)
                    run("reference", _copy(args, torch.float64))

    with compile_only_launches():
        if not MAMBA2_ONLY:
            steps(model, (1, 64))
        steps(build_model("mamba2"), (1, 64))
        if checks:
            blocks(BATCHES2, block_args2, run_block2)
        if MAMBA2_ONLY:
            return time.time() - start
        if checks:
            blocks(BATCHES, block_args, run_block)
            run_block("reference", block_args(4, torch.bfloat16, "x+res"))  # the 2^31 check's end rows
        if sweep:
            default = dict(mdt.TILES)
            for batch, override in SWEEP:
                mdt.TILES = {**default, **override}
                try:
                    steps(model, (batch,), ("triton",))
                    run_block("triton", block_args(batch, torch.bfloat16, "x+res"))
                finally:
                    mdt.TILES = default
    return time.time() - start


def _guarded(rows):
    """The rows of a generator, ending with an error row (after its traceback) if it raises."""
    try:
        yield from rows
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        yield {"kernel": f"raised {type(error).__name__}: {error}"[:200], "shape": "-"}


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2e}" if isinstance(value, float) and value < 1e-2 and value != 0 else (
        f"{value:.4f}" if isinstance(value, float) else str(value))


def main() -> None:
    import argparse

    global DEV, SMOKE, MAMBA2_ONLY
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time the tile settings in SWEEP")
    parser.add_argument("--budget", type=float, default=None, help="seconds; the sweep stops after it")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-large", action="store_true", help="leave out the 2^31-element check")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--generate", action="store_true",
                        help="after the checks: scripts/bench_generate.py --only throughput --presets mamba1-130m")
    parser.add_argument("--cpu-smoke", action="store_true", help="CPU + Triton interpreter at tiny shapes")
    parser.add_argument("--mamba2-only", action="store_true", help="only the fused Mamba-2 step's checks and bench")
    parser.add_argument("--scan-step", action="store_true",
                        help="only the batch-16/64 step with dt_proj inside the scan kernel (check + time)")
    parser.add_argument("--split-k", action="store_true",
                        help="only the batch-16/64 step with split-K matmuls (checks + times + tile sweep)")
    parser.add_argument("--head", action="store_true",
                        help="only the batch-16/64 step's LM head + greedy pick kernels (checks + times + tile sweep)")
    args = parser.parse_args()
    MAMBA2_ONLY = args.mamba2_only
    start = time.time()
    deadline = None if args.budget is None else start + args.budget
    if args.cpu_smoke:
        DEV, SMOKE = "cpu", True
    print(f"torch {torch.__version__}, device: "
          f"{torch.cuda.get_device_name() if not SMOKE else 'cpu (interpreter)'}", flush=True)
    if args.scan_step or args.split_k or args.head:
        rows, times = _head_rows() if args.head else _split_k_rows() if args.split_k else _scan_step_rows()
        print("| case | shape | dtype | rel err | result | note |\n|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['name']} | {row['shape']} | {row['dtype']} | {_fmt(row['err_fwd'])} | "
                  f"{'PASS' if row['pass'] else 'FAIL'} | {row['note']} |")
        print("\n| what | shape | ours ms | before ms | before / ours |\n|---|---|---|---|---|")
        for row in times:
            ours, base = row["ours_fwd_ms"], row["baseline_fwd_ms"]
            print(f"| {row['kernel']} | {row['shape']} | {_fmt(ours)} | {_fmt(base)} | {base / ours:.2f}x |")
        print("\n| setting | shape | step ms | note |\n|---|---|---|---|", flush=True)
        sweep = _head_sweep_rows() if args.head else _split_sweep_rows() if args.split_k else _scan_sweep_rows()
        for row in _guarded(sweep):
            print(f"| {row['kernel']} | {row['shape']} | {_fmt(row.get('ours_fwd_ms'))} | {row.get('note', '')} |",
                  flush=True)
        return
    if not SMOKE:
        try:
            print(f"precompiled in {precompile(not args.skip_checks, args.sweep and not args.skip_bench):.1f} s",
                  flush=True)
        except Exception:  # noqa: BLE001  (the real calls compile what they need)
            traceback.print_exc()
    if not args.skip_checks:
        print("| case | shape | dtype | rel err | result | note |\n|---|---|---|---|---|---|", flush=True)
        failed = 0
        mamba1 = () if MAMBA2_ONLY else (_block_checks, *(() if args.skip_large else (_large_check,)), _logits_checks,
                                         _model_checks)
        for group in (*mamba1, _m2_block_checks, _m2_model_checks):
            try:
                rows = group()
            except Exception as error:  # noqa: BLE001  (report it and go on)
                traceback.print_exc()
                rows = [check_row(f"{group.__name__} raised {type(error).__name__}: {error}"[:200], "-", "-",
                                  math.inf, None, 0.0)]
            for row in rows:
                failed += not row["pass"]
                print(f"| {row['name']} | {row['shape']} | {row['dtype']} | {_fmt(row['err_fwd'])} | "
                      f"{'PASS' if row['pass'] else 'FAIL'} | {row['note']} |", flush=True)
        print(f"checks: {failed} failed ({time.time() - start:.0f} s)", flush=True)
    if args.generate:
        import scripts.bench_generate as bench_generate

        # (it reports a failing row in its table and goes on)
        bench_generate.main(["--only", "throughput", "--presets", "mamba1-tiny" if SMOKE else "mamba1-130m"]
                            + (["--quick", "--batches", "1", "2"] if SMOKE else []))
        print(f"generate done ({time.time() - start:.0f} s)", flush=True)
    if args.skip_bench:
        return
    print("\n| what | shape | fused ms | op-by-op ms | op-by-op / fused | GB/s (fused) | note |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    rows = _bench_rows(family="mamba2") if MAMBA2_ONLY else itertools.chain(_bench_rows(), _bench_rows(family="mamba2"))
    if args.sweep and not MAMBA2_ONLY:
        rows = itertools.chain(rows, _sweep_rows(deadline))
    for row in _guarded(rows):
        ours, base = row.get("ours_fwd_ms"), row.get("baseline_fwd_ms")
        ratio = f"{base / ours:.2f}x" if ours and base else "-"
        gbps = f"{row['bytes_fwd'] / (ours * 1e-3) / 1e9:.0f}" if ours and row.get("bytes_fwd") else "-"
        print(f"| {row['kernel']} | {row['shape']} | {_fmt(ours)} | {_fmt(base)} | {ratio} | {gbps} | "
              f"{row.get('note', '')} |", flush=True)
    print(f"bench done ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
