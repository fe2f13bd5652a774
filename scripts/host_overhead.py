"""Host (Python + dispatcher) time of the GPU code path, measured on a CPU with the kernel launches stubbed.

    PYTHONPATH=. python3 scripts/host_overhead.py [--preset mamba1-130m] [--d-model 64] [--batch 1]
        [--seq-len 512] [--repeats 20] [--profile 25]

At batch 1 a 130M model's prefill and small training steps are host-bound on an H100 (docs/generation.md:
19.8 ms of a 512-token prefill is host work around 2.4 ms of GPU work), so the Python around the kernels
is what to cut, and it can be cut without a GPU. This runs the model's Triton code path on CPU tensors
(``TRITON_INTERPRET=1``, every op forced to its ``triton`` backend) with each Triton launch replaced by a
no-op that only counts it, and the model shrunk to ``--d-model`` (same blocks, same pattern) so that the
remaining torch ops on tiny tensors cost about what launching them costs on a GPU. What it prints:

    phase      the timed call: ``train`` (forward + backward of the LM loss), ``forward`` (no grad),
               ``prefill`` (no grad, with an inference cache, as ``core.generate`` runs it)
    ms         median wall time of one call over ``--repeats`` calls
    per layer  ms / number of blocks
    launches   Triton launches per call (stubbed: their host cost is in ``ms``, their GPU time is not)

The outputs are garbage (the kernels never run); only the time means something. It is a proxy: a CUDA
launch costs a few microseconds of host time where a CPU op on a [1, 512, 64] tensor costs about the
same, so compare variants of the code with it, not with a GPU's absolute numbers. ``--profile N`` prints
the N functions with the most own time (cProfile) for the prefill.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

# Before the kernels import Triton: every op on its Triton path, interpreted on CPU tensors.
os.environ["TRITON_INTERPRET"] = "1"
os.environ["SSM_SUITE_BACKEND"] = "triton"

import torch  # noqa: E402
import triton.runtime.interpreter as triton_interpreter  # noqa: E402

from core.backbone import CausalLM  # noqa: E402
from core.presets import get_preset  # noqa: E402

LAUNCHES = [0]


def _stubbed_run(self, *args, grid, warmup, **kwargs):
    """Stands in for ``InterpretedFunction.run``: count the launch, run nothing."""
    if not warmup:
        LAUNCHES[0] += 1


def build_model(preset: str, d_model: int) -> CausalLM:
    """The preset with d_model (and the sizes derived from it) shrunk; same pattern and block count."""
    config = get_preset(preset)
    overrides: dict = {"d_model": d_model, "vocab_size": 256}
    if "*" in config.pattern:
        heads = max(1, min(config.attention.n_heads, d_model // 16))
        kv = min(config.attention.n_kv_heads or heads, heads)
        overrides["attention"] = {"n_heads": heads, "n_kv_heads": kv if heads % kv == 0 else heads,
                                  "head_dim": None}
    if "M" in config.pattern:
        overrides["mamba2"] = {"headdim": 16}
    return CausalLM(get_preset(preset, **overrides))


def time_phase(model: CausalLM, phase: str, batch: int, seq_len: int, repeats: int) -> tuple[float, int]:
    """Median ms of one call and the Triton launches it makes."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))

    def call() -> None:
        if phase == "train":
            model(ids, labels=ids).loss.backward()
        elif phase == "forward":
            with torch.no_grad():
                model(ids)
        else:
            with torch.no_grad():
                cache = model.allocate_cache(batch, seq_len + 1)
                model(ids, cache=cache, num_last_tokens=1)

    call()  # the first call rewrites the interpreted kernels and fills caches: not timed
    times = []
    for _ in range(repeats):
        LAUNCHES[0] = 0
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1e3)
        model.zero_grad(set_to_none=True)
    return statistics.median(times), LAUNCHES[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mamba1-130m")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--phases", default="train,forward,prefill")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N functions with the most own time in the prefill (cProfile)")
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - {"train", "forward", "prefill"}
    if unknown:
        parser.error(f"unknown phase(s) {sorted(unknown)}: choose from train, forward, prefill")
    torch.set_num_threads(1)
    triton_interpreter.InterpretedFunction.run = _stubbed_run
    torch.manual_seed(0)
    model = build_model(args.preset, args.d_model)
    blocks = len(model.config.pattern)
    print(f"{args.preset} at d_model {args.d_model} ({blocks} blocks), B{args.batch} L{args.seq_len}, "
          f"Triton launches stubbed, torch {torch.__version__}, 1 thread")
    print("\n| phase | ms | per layer (ms) | launches |\n|---|---|---|---|")
    for phase in phases:
        ms, launches = time_phase(model, phase, args.batch, args.seq_len, args.repeats)
        print(f"| {phase} | {ms:.2f} | {ms / blocks:.3f} | {launches} |", flush=True)
    if args.profile:
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len))
        profiler = cProfile.Profile()
        with torch.no_grad():
            for _ in range(5):
                cache = model.allocate_cache(args.batch, args.seq_len + 1)
                profiler.runcall(model, ids, cache=cache, num_last_tokens=1)
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
