"""Long-context training on one GPU: peak memory, step time and tokens/s of the 130M presets at 16K..256K
tokens per sequence, with activation checkpointing off and on, and the longest length each one trains at.

    PYTHONPATH=$PWD python3 scripts/bench_long_context.py            # one GPU (~4 minutes on an H100)
    PYTHONPATH=$PWD python3 scripts/bench_long_context.py --quick    # CPU smoke: tiny presets, 64/128 tokens

One training step = forward + backward + AdamW (fused) at batch 1, under bf16 autocast with fp32 weights
(as ``lm train`` with ``trainer=gpu`` runs it), on random tokens. The loss is CausalLM's chunked LM
head + cross-entropy (``ModelConfig.loss_chunk_size``, :mod:`core.chunked_loss`; 4096 positions a chunk:
the [L, vocab] logits never exist at once); activation checkpointing is :func:`core.parallel.apply_activation_checkpointing` (every
block, non-reentrant). Attention runs under ``sdpa_kernel`` restricted to the fused kernels (flash,
memory-efficient, cuDNN): a shape that would fall back to the O(L^2)-memory math kernel fails with an
error instead of silently using it.

For each preset the lengths are tried in increasing order; after an out-of-memory the longer lengths are
not tried ("OOM" for the first that failed, "-" after it). Reported per case: peak memory
(``torch.cuda.max_memory_allocated`` over the steps, including the weights, gradients and AdamW states:
16 bytes per parameter, about 2 GiB for these models), the step time (median of the timed steps after
one warm-up step, which includes Triton's compilation) and tokens/s. ``growth``: (peak - static) at L
over (peak - static) at the previous length, where static is what stays between steps (weights and
AdamW states): 2.0 is linear in the length, 4.0 would be quadratic. A last row runs hybrid-130m with
the unchunked loss (the full logits), to show what chunking saves. ``--time-budget`` stops starting new
cases after that many seconds (marked "not run").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import torch  # noqa: E402

from core.backbone import CausalLM  # noqa: E402
from core.parallel import apply_activation_checkpointing  # noqa: E402
from core.presets import get_preset  # noqa: E402

GiB = 2**30
PRESETS = ("hybrid-130m", "mamba2-130m", "mamba1-130m", "transformer++-125m")
TINY = ("hybrid-tiny", "mamba2-tiny", "mamba1-tiny", "transformer++-tiny")
LENGTHS = (16384, 32768, 65536, 131072)
SSM_EXTRA = (262144,)  # tried for the attention-free presets only
LOSS_CHUNK = 4096  # positions per chunk of the LM head + cross-entropy (the long-context recipe's)


@dataclass
class Case:
    preset: str
    checkpointing: bool
    loss_chunk: int
    results: dict[int, dict] = field(default_factory=dict)  # length -> {status, peak, step, static, loss}

    @property
    def label(self) -> str:
        loss = "" if self.loss_chunk else ", unchunked loss"
        return f"{self.preset}{loss}"


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def fused_attention_only(device: torch.device):
    """On CUDA, forbid SDPA's math kernel (O(L^2) memory): a case that needs it errors out instead."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def build(preset: str, checkpointing: bool, device: torch.device, max_len: int, loss_chunk: int
          ) -> tuple[CausalLM, torch.optim.Optimizer]:
    """The preset (loss over chunks of ``loss_chunk`` positions; 0: all logits at once) and its AdamW."""
    torch.manual_seed(0)
    config = get_preset(preset)
    config.loss_chunk_size = loss_chunk or None
    if "H" in config.pattern:
        config.hyena.max_seqlen = max(config.hyena.max_seqlen, max_len)
    model = CausalLM(config, device=device)
    if checkpointing:
        apply_activation_checkpointing(model, "full")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    return model, optimizer


def train_step(model: CausalLM, optimizer: torch.optim.Optimizer, ids: torch.Tensor, device: torch.device) -> float:
    """One forward + backward + AdamW step; returns the loss."""
    with fused_attention_only(device):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model: CausalLM, optimizer: torch.optim.Optimizer, length: int, device: torch.device, warmup: int,
            steps: int) -> dict:
    """Run warmup + steps training steps at ``length``; the peak memory and the median step time."""
    generator = torch.Generator(device="cpu").manual_seed(length)
    ids = torch.randint(0, model.config.vocab_size, (1, length + 1), generator=generator).to(device)
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], float("nan")
    for i in range(warmup + steps):
        sync(device)
        started = time.perf_counter()
        step_loss = train_step(model, optimizer, ids, device)
        sync(device)
        if i == 0:
            loss = step_loss
        if i >= warmup:
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    # What stays between steps (weights, AdamW states; the gradients are freed by zero_grad): measured
    # after the steps, since AdamW allocates its states in the first one.
    static = torch.cuda.memory_allocated() if cuda else 0
    return {"status": "ok", "peak": peak, "static": static, "step": statistics.median(times), "loss": loss}


def run_case(case: Case, lengths: tuple[int, ...], device: torch.device, warmup: int, steps: int,
             deadline: float) -> None:
    model = optimizer = None
    try:
        model, optimizer = build(case.preset, case.checkpointing, device, max(lengths), case.loss_chunk)
        failed = False
        for length in lengths:
            if failed:
                case.results[length] = {"status": "-"}
                continue
            if time.perf_counter() > deadline:
                case.results[length] = {"status": "not run"}
                continue
            try:
                case.results[length] = measure(model, optimizer, length, device, warmup, steps)
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not is_oom(error):
                    message = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
                    case.results[length] = {"status": f"error: {message}"}
                else:
                    case.results[length] = {"status": "OOM"}
                failed = True
                optimizer.zero_grad(set_to_none=True)
            print(f"  {case.label:<34} AC {'on ' if case.checkpointing else 'off'} {length:>7}: "
                  f"{describe(case.results[length])}", flush=True)
    finally:
        del model, optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def describe(result: dict) -> str:
    if result["status"] != "ok":
        return result["status"]
    peak = "n/a" if result["peak"] is None else f"{result['peak'] / GiB:.2f} GiB"
    return f"peak {peak}, step {result['step']:.3f} s, loss {result['loss']:.4f}"


def label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def cells(result: dict | None, half: dict | None) -> str:
    if result is None:
        return " | | | "
    if result["status"] != "ok":
        return f" {result['status']} | | | "
    peak = "n/a" if result["peak"] is None else f"{result['peak'] / GiB:.2f}"
    growth = ""
    if result["peak"] is not None and half is not None and half.get("status") == "ok":
        over_half = half["peak"] - half["static"]
        if over_half > 0:
            growth = f"{(result['peak'] - result['static']) / over_half:.2f}"
    return f" {peak} | {result['step']:.3f} | {int(round(result['results_len'] / result['step'])):,} | {growth} "


def table(cases: list[Case], lengths: tuple[int, ...]) -> list[str]:
    lines = ["| preset | length | AC off: peak (GiB) | step (s) | tok/s | growth | AC on: peak (GiB) | step (s) "
             "| tok/s | growth |", "|---|---|---|---|---|---|---|---|---|---|"]
    by_label: dict[str, dict[bool, Case]] = {}
    for case in cases:
        by_label.setdefault(case.label, {})[case.checkpointing] = case
    for name, modes in by_label.items():
        for i, length in enumerate(lengths):
            row = []
            for checkpointing in (False, True):
                case = modes.get(checkpointing)
                result = None if case is None else case.results.get(length)
                half = None if case is None or i == 0 else case.results.get(lengths[i - 1])
                if result is not None and result["status"] == "ok":
                    result = {**result, "results_len": length}
                row.append(cells(result, half))
            if all(r == " | | | " for r in row):
                continue
            lines.append(f"| {name} | {label(length)} |" + "|".join(row) + "|")
    return lines


def longest(cases: list[Case]) -> list[str]:
    lines = ["| preset | longest, AC off | peak (GiB) | longest, AC on | peak (GiB) |", "|---|---|---|---|---|"]
    by_label: dict[str, dict[bool, Case]] = {}
    for case in cases:
        by_label.setdefault(case.label, {})[case.checkpointing] = case
    for name, modes in by_label.items():
        row = []
        for checkpointing in (False, True):
            case = modes.get(checkpointing)
            ok = [] if case is None else [(n, r) for n, r in case.results.items() if r["status"] == "ok"]
            if not ok:
                row.append(" none | ")
                continue
            n, r = max(ok)
            tried_longer = any(m > n and r2["status"] != "not run" for m, r2 in case.results.items())
            suffix = "" if tried_longer else " (longest tried)"
            peak = "n/a" if r["peak"] is None else f"{r['peak'] / GiB:.2f}"
            row.append(f" {label(n)}{suffix} | {peak} ")
        lines.append(f"| {name} |" + "|".join(row) + "|")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke: tiny presets at 64 and 128 tokens")
    parser.add_argument("--presets", nargs="+", default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--loss-chunk", type=int, default=LOSS_CHUNK,
                        help="positions per chunk of the LM head + cross-entropy (0: all logits at once)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per case (after the warm-up)")
    parser.add_argument("--time-budget", type=float, default=210.0, help="seconds after which no new case starts")
    args = parser.parse_args(argv)
    if args.loss_chunk < 0:
        parser.error(f"--loss-chunk must be >= 0 (0: all logits at once), got {args.loss_chunk}")

    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    if args.quick:
        presets = tuple(args.presets or TINY)
        lengths = tuple(args.lengths or (64, 128))
        extra: tuple[int, ...] = ()
        loss_chunk = min(args.loss_chunk, 32)
    else:
        if not cuda:
            print("bench_long_context: no CUDA device; run with --quick for the CPU smoke test", file=sys.stderr)
            return 2
        presets = tuple(args.presets or PRESETS)
        lengths = tuple(args.lengths or LENGTHS)
        extra = () if args.lengths else SSM_EXTRA
        loss_chunk = args.loss_chunk
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"# Long-context training, batch 1 ({datetime.date.today()}, {name}, torch {torch.__version__})\n")
    print(f"command: python3 scripts/bench_long_context.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")

    deadline = started + args.time_budget
    cases: list[Case] = []
    all_lengths = tuple(sorted(set(lengths) | set(extra)))
    # Checkpointing on first: if the time budget runs out, the longest-length answers are already in.
    for checkpointing in (True, False):
        for preset in presets:
            attention = "*" in get_preset(preset).pattern
            case_lengths = lengths if attention else tuple(sorted(set(lengths) | set(extra)))
            case = Case(preset, checkpointing, loss_chunk)
            run_case(case, case_lengths, device, args.warmup, args.steps, deadline)
            cases.append(case)
    # What chunking the loss saves: the hybrid with the full [L, vocab] logits, checkpointing on.
    reference = Case(presets[0], True, 0)
    run_case(reference, lengths, device, args.warmup, args.steps, deadline)
    cases.append(reference)

    print("\n## Peak memory, step time, tokens/s (batch 1, bf16 autocast, AdamW)\n" if cuda else
          "\n## CPU smoke (fp32; no memory statistics)\n")
    print("\n".join(table(cases, all_lengths)))
    print("\n## Longest length trained per preset\n")
    print("\n".join(longest(cases)))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")

    if args.quick:
        # Checkpointing recomputes the same ops on the same inputs: the first step's loss must not change.
        bad = []
        by_key = {(c.label, c.checkpointing): c for c in cases}
        for case in cases:
            other = by_key.get((case.label, not case.checkpointing))
            for length, result in case.results.items():
                if result["status"] != "ok":
                    bad.append(f"{case.label} AC {case.checkpointing} {length}: {result['status']}")
                elif other is not None and other.results.get(length, {}).get("status") == "ok":
                    if abs(result["loss"] - other.results[length]["loss"]) > 1e-4:
                        bad.append(f"{case.label} {length}: loss {result['loss']} vs {other.results[length]['loss']}")
        # ... and neither does chunking it: the unchunked reference row against the same preset chunked.
        chunked = by_key.get((Case(presets[0], True, loss_chunk).label, True))
        for length, result in reference.results.items():
            mine = None if chunked is None else chunked.results.get(length)
            if loss_chunk and result["status"] == "ok" and mine is not None and mine["status"] == "ok":
                if abs(result["loss"] - mine["loss"]) > 1e-4:
                    bad.append(f"{reference.label} {length}: loss {result['loss']} vs {mine['loss']} chunked")
        if bad:
            print("FAILED:\n" + "\n".join(bad))
            return 1
        print("quick check passed: every case ran, neither checkpointing nor chunking the loss changes it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
