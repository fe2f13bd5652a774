"""Training throughput of the 130M presets (tokens/s), ours beside mamba_ssm's MambaLMHeadModel.

    PYTHONPATH=. python3 scripts/bench_training.py [--presets mamba1-130m mamba2-130m] [--batch 8 --seq-len 2048]
        [--rounds 3] [--ssd-designs first,fused] [--compile] [--profile] [--idle]

One optimizer step = forward + backward + AdamW (fused) under bf16 autocast, fp32 weights, as the
training module runs it. Timed with CUDA events after warm-up; the median of the timed steps is one
measurement. mamba_ssm's model is built with the same shape (its own default config otherwise) when
importable. With ``--rounds R`` every variant (ours with each ``--ssd-designs`` design, mamba_ssm) is
measured R times, interleaved, in this one process: the same-process comparison that separates a real
difference from the 10-30 % by which the same code varied between GPU machines (docs/benchmarks.md).
``--idle`` profiles one more step of every variant and reports where the GPU waited for the host
(``scripts/idle_gaps.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

import torch

from core.backbone import CausalLM
from core.parallel import compile_blocks
from core.presets import get_preset


def time_steps(model: torch.nn.Module, batch: int, seq_len: int, vocab: int, steps: int, warmup: int,
               loss_fn) -> float:
    """Median seconds per optimizer step (CUDA events on a GPU; the wall clock on CPU, the smoke test's)."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            began = time.perf_counter()
        optimizer_step(model, optimizer, ids, loss_fn)
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            seconds = time.perf_counter() - began
        if i >= warmup:
            times.append(seconds)
    return statistics.median(times)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, loss_fn) -> None:
    """One step on ids int64 [B, L + 1]: forward + backward under bf16 autocast, the optimizer, gradients
    cleared."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        loss = loss_fn(model, ids[:, :-1], ids[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def profiled_step(model: torch.nn.Module, batch: int, seq_len: int, vocab: int, loss_fn, activities: list,
                  warmup: int = 0):
    """torch.profiler's record of one optimizer step (a fresh AdamW, after ``warmup`` unprofiled steps)."""
    from torch.profiler import profile

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), device="cuda")
    for _ in range(warmup):
        optimizer_step(model, optimizer, ids, loss_fn)
    torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        optimizer_step(model, optimizer, ids, loss_fn)
        torch.cuda.synchronize()
    return prof


def profile_step(model: torch.nn.Module, batch: int, seq_len: int, vocab: int, loss_fn, label: str) -> None:
    """One more optimizer step under torch.profiler: the kernels by device time, grouped by name (so a
    model's time can be set against mamba_ssm's kernel by kernel)."""
    from torch.profiler import ProfilerActivity

    prof = profiled_step(model, batch, seq_len, vocab, loss_fn, [ProfilerActivity.CUDA])
    print(f"\n{label}: one optimizer step's kernels by device time\n"
          + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=60),
          flush=True)


def idle_step(model: torch.nn.Module, batch: int, seq_len: int, vocab: int, loss_fn, label: str) -> None:
    """One more optimizer step under torch.profiler (CPU and CUDA activity): where the GPU idled and which
    host op it was waiting for (scripts/idle_gaps.py)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity

    from scripts.idle_gaps import idle_report

    # Two unprofiled steps first: the optimizer's state is allocated outside the profile.
    prof = profiled_step(model, batch, seq_len, vocab, loss_fn, [ProfilerActivity.CPU, ProfilerActivity.CUDA],
                         warmup=2)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as trace_file:
            trace = json.load(trace_file)
    print(f"\n{label}: where the GPU waited in one optimizer step\n{idle_report(trace)}", flush=True)


def ours_loss(model, inputs, labels):
    return model(inputs, labels=labels).loss


def mamba_ssm_loss(model, inputs, labels):
    logits = model(inputs).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def mamba_ssm_model(preset: str):
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except ImportError:
        return None
    config = get_preset(preset)
    layer = "Mamba1" if set(config.pattern) == {"S"} else "Mamba2" if set(config.pattern) == {"M"} else None
    if layer is None:
        return None
    ssm_cfg = {"layer": layer}
    if layer == "Mamba2":
        ssm_cfg.update(d_state=config.mamba2.d_state, headdim=config.mamba2.headdim,
                       chunk_size=config.mamba2.chunk_size, ngroups=config.mamba2.ngroups)
    cfg = MambaConfig(d_model=config.d_model, n_layer=len(config.pattern), vocab_size=config.vocab_size,
                      ssm_cfg=ssm_cfg, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                      pad_vocab_size_multiple=config.pad_vocab_size_multiple, tie_embeddings=True)
    return MambaLMHeadModel(cfg, device="cuda", dtype=torch.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["mamba1-130m", "mamba2-130m"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every variant this many times, interleaved (ours, mamba_ssm, ours, ...), "
                             "and report the median and range: drift of the machine hits all variants alike")
    parser.add_argument("--ssd-designs", default="",
                        help="comma-separated SSD Triton designs to time ours with (SSM_SUITE_SSD_TRITON: first, "
                             "fused), in the same process; default: the environment's")
    parser.add_argument("--profile", action="store_true", help="also print one step's kernels by device time")
    parser.add_argument("--idle", action="store_true",
                        help="also profile one step per variant: GPU idle time, blamed on host ops")
    parser.add_argument("--compile", action="store_true",
                        help="also time ours with every block torch.compile-d (trainer.compile=true)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of the script (tiny presets)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_training needs a CUDA GPU (--device cpu runs the script's code path on CPU, for tests)")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if (args.profile or args.idle) and args.device != "cuda":
        parser.error("--profile / --idle report CUDA kernel times: they need --device cuda")
    designs = [d for d in args.ssd_designs.split(",") if d] or [os.environ.get("SSM_SUITE_SSD_TRITON", "")]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, B{args.batch} L{args.seq_len}, "
          f"bf16 autocast, {args.rounds} round(s) of median-of-{args.steps} steps")
    tokens = args.batch * args.seq_len
    rows = []
    for preset in args.presets:
        config = get_preset(preset)
        # Each variant: (label, model, loss function, SSD design or None). The SSD design is read by the
        # dispatch at every call, so ours can run with each design in turn in this one process.
        ours_model = CausalLM(config).to(args.device)
        uses_ssd = "M" in config.pattern
        variants = [(f"ours ({d or 'default'} SSD)" if uses_ssd else "ours", ours_model, ours_loss, d)
                    for d in (designs if uses_ssd else [None])]
        if args.compile:
            # The same weights, every block torch.compile-d as trainer.compile=true does (the warm-up steps
            # compile; the SSD design is read at trace time, so each design gets its own compiled copy).
            for label, _, loss_fn, design in list(variants):
                twin = copy.deepcopy(ours_model)
                compile_blocks(twin, backend=args.compile_backend)
                variants.append((label + ", compiled", twin, loss_fn, design))
        baseline = mamba_ssm_model(preset) if args.device == "cuda" else None
        if baseline is not None:
            variants.append(("mamba_ssm", baseline, mamba_ssm_loss, None))
        times: dict[str, list[float]] = {label: [] for label, *_ in variants}
        for _ in range(args.rounds):
            for label, model, loss_fn, design in variants:
                with _ssd_design(design):
                    times[label].append(time_steps(model, args.batch, args.seq_len, config.vocab_size, args.steps,
                                                   args.warmup, loss_fn))
        if args.profile:
            for label, model, loss_fn, design in variants:
                with _ssd_design(design):
                    profile_step(model, args.batch, args.seq_len, config.vocab_size, loss_fn, f"{preset}, {label}")
        if args.idle:
            for label, model, loss_fn, design in variants:
                with _ssd_design(design):
                    idle_step(model, args.batch, args.seq_len, config.vocab_size, loss_fn, f"{preset}, {label}")
        theirs = statistics.median(times["mamba_ssm"]) if "mamba_ssm" in times else None
        for label, seconds in times.items():
            median = statistics.median(seconds)
            row = (preset, label, tokens / median, tokens / max(seconds), tokens / min(seconds),
                   None if theirs is None or label == "mamba_ssm" else theirs / median)
            rows.append(row)
            print(f"{preset}, {label}: {row[2]:,.0f} tok/s (range {row[3]:,.0f}-{row[4]:,.0f})", flush=True)
        del ours_model, baseline, variants, model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print("\n| preset | model | tok/s (median of rounds) | range | vs mamba_ssm |\n|---|---|---|---|---|")
    for preset, label, median, low, high, ratio in rows:
        print(f"| {preset} | {label} | {median:,.0f} | {low:,.0f}-{high:,.0f} | "
              f"{'-' if ratio is None else f'{ratio:.2f}x'} |")


@contextlib.contextmanager
def _ssd_design(design: str | None):
    """SSM_SUITE_SSD_TRITON set to ``design`` for the body (None: leave the environment alone)."""
    if design is None:
        yield
        return
    saved = os.environ.get("SSM_SUITE_SSD_TRITON")
    os.environ["SSM_SUITE_SSD_TRITON"] = design
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SSM_SUITE_SSD_TRITON", None)
        else:
            os.environ["SSM_SUITE_SSD_TRITON"] = saved


if __name__ == "__main__":
    main()
