"""Single-GPU vs DDP vs FSDP smoke trainings at equal global batch: losses and tokens/s, one table.

    PYTHONPATH=$PWD python3 scripts/bench_multi_gpu.py                    # hybrid-130m on 2 GPUs
    PYTHONPATH=$PWD python3 scripts/bench_multi_gpu.py --strategies single,ddp,fsdp,ddp+ac,fsdp+ac
    PYTHONPATH=$PWD python3 scripts/bench_multi_gpu.py --cpu-smoke        # hybrid-tiny, 2 CPU processes, gloo

Each strategy is one training of ``--steps`` optimizer steps from the same initial weights on the same
samples (a learnable synthetic stream, seeded by sample index): ``single`` on one device with the whole
global batch, ``ddp`` / ``fsdp`` on ``--devices`` processes with ``global_batch / devices`` each
(``+ac``: with activation checkpointing on every block). The trainings go through Lightning with the
suite's own pieces: :class:`core.training.CausalLMModule` (AdamW, warmup + cosine, clipping),
:func:`core.parallel.build_strategy`, the activation-checkpointing callback and
:class:`core.training.ResumableSampler` sharding the samples by rank.

Every process is started here with torchrun's environment variables (RANK, WORLD_SIZE, ...), so
Lightning joins them instead of launching its own. Reported per strategy: the loss of the first step and
the mean of the last five (each step's loss is the mean over all ranks, i.e. the global batch's), the
largest per-step loss difference from ``single``, tokens/s over the steps after warm-up (global tokens per
step / median step time), the speed-up over ``single`` and the peak memory of one device. With fp32
(``--cpu-smoke``) the losses must match ``single`` to 1e-4 and the script exits non-zero otherwise; under
bf16 the differences of a correct run are rounding-level (bf16 autocast and reduction order), typically
below 1e-2 early in training, and are reported without a verdict.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOKE_TOLERANCE = 1e-4


# --------------------------------------------------------------------------------------------------
# The worker: one process of one training
# --------------------------------------------------------------------------------------------------

def synthetic_windows(num_samples: int, seq_len: int, vocab: int):
    """Windows of a stream whose next token is the previous one plus a small random step (mod vocab):
    learnable (the conditional entropy is about 1.3 nats) and generated from the sample index alone."""
    import torch

    steps = torch.tensor([1, 2, 3, 5, 8, 13, 21, 34])
    probs = torch.tensor([0.4, 0.2, 0.12, 0.08, 0.07, 0.06, 0.04, 0.03])

    class Windows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return num_samples

        def __getitem__(self, index: int) -> dict:
            gen = torch.Generator().manual_seed(12345 + index)
            start = torch.randint(0, vocab, (1,), generator=gen)
            deltas = steps[torch.multinomial(probs, seq_len, replacement=True, generator=gen)]
            ids = (start + torch.cat([torch.zeros(1, dtype=torch.long), deltas.cumsum(0)])) % vocab
            return {"input_ids": ids[:-1], "labels": ids[1:]}

    return Windows()


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from core.parallel import activation_checkpointing_callback, build_strategy
    from core.presets import get_preset
    from core.training import CausalLMModule, OptimConfig, ResumableSampler

    strategy_name, _, suffix = args.strategy.partition("+")
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    cpu = args.cpu_smoke
    if cpu:
        torch.set_num_threads(1)
    per_device = args.global_batch // world
    config = get_preset(args.preset)
    trainer_cfg = {"strategy": "auto" if strategy_name == "single" else strategy_name,
                   "accelerator": "cpu" if cpu else "gpu", "devices": world, "num_nodes": 1,
                   "precision": args.precision, "activation_checkpointing": suffix == "ac"}
    L.seed_everything(0)
    module = CausalLMModule(config, OptimConfig(lr=args.lr, warmup_steps=max(1, args.steps // 10),
                                                max_steps=args.steps))
    n_params = sum(p.numel() for p in module.model.parameters())  # before FSDP shards them
    data = synthetic_windows(args.steps * args.global_batch, args.seq_len, config.vocab_size)
    loader = torch.utils.data.DataLoader(data, batch_size=per_device, drop_last=True,
                                         sampler=ResumableSampler(len(data)))

    class Record(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.times: list[float] = []
            self.started = 0.0

        def _sync(self) -> None:
            if not cpu:
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._sync()
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._sync()
            self.times.append(time.perf_counter() - self.started)
            loss = trainer.callback_metrics["train/loss"].detach().float().to(pl_module.device)
            self.losses.append(float(trainer.strategy.reduce(loss, reduce_op="mean")))

    record = Record()
    callbacks = [record]
    checkpointing = activation_checkpointing_callback(trainer_cfg)
    if checkpointing is not None:
        callbacks.append(checkpointing)
    trainer = L.Trainer(accelerator=trainer_cfg["accelerator"], devices=world, num_nodes=1,
                        strategy=build_strategy(trainer_cfg), precision=args.precision, max_steps=args.steps,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, default_root_dir=args.out)
    trainer.fit(module, train_dataloaders=loader)
    if rank == 0:
        warm = min(len(record.times) - 1, max(2, args.steps // 4))
        step_time = statistics.median(record.times[warm:])
        result = {
            "strategy": args.strategy, "devices": world, "per_device_batch": per_device,
            "global_batch": per_device * world, "losses": record.losses,
            "tokens_per_s": per_device * world * args.seq_len / step_time, "step_time": step_time,
            "peak_mem_gb": None if cpu else torch.cuda.max_memory_allocated() / 2**30,
            "parameters": n_params,
        }
        Path(args.result).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------
# The driver: launch each training's processes, compare, print the table
# --------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(strategy: str, world: int, args: argparse.Namespace, out: Path) -> dict | None:
    result = out / f"{strategy}.json"
    result.unlink(missing_ok=True)
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if args.cpu_smoke:
            env.update({"OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"})
        log = out / f"{strategy}_rank{rank}.log"
        logs.append(log)
        command = [sys.executable, __file__, "--worker", "--strategy", strategy, "--result", str(result),
                   "--preset", args.preset, "--steps", str(args.steps), "--global-batch", str(args.global_batch),
                   "--seq-len", str(args.seq_len), "--precision", args.precision, "--lr", str(args.lr),
                   "--out", str(out)] + (["--cpu-smoke"] if args.cpu_smoke else [])
        procs.append(subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT))
    deadline = time.monotonic() + args.timeout
    failed = False
    for proc in procs:
        try:
            failed |= proc.wait(timeout=max(1.0, deadline - time.monotonic())) != 0
        except subprocess.TimeoutExpired:
            failed = True
            for p in procs:
                p.kill()
    if failed or not result.is_file():
        print(f"\n{strategy}: FAILED (logs: {', '.join(map(str, logs))}); last lines of rank 0:", file=sys.stderr)
        print(logs[0].read_text()[-3000:], file=sys.stderr)
        return None
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, help="model preset (default hybrid-130m; hybrid-tiny with --cpu-smoke)")
    parser.add_argument("--devices", type=int, default=2, help="processes of the ddp / fsdp runs")
    parser.add_argument("--strategies", default=None,
                        help="comma-separated: single, ddp, fsdp, each optionally +ac (activation checkpointing); "
                             "default single,ddp,fsdp")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40; 6 with --cpu-smoke)")
    parser.add_argument("--global-batch", type=int, default=None, help="sequences per step over all devices (16; 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (1024; 64)")
    parser.add_argument("--precision", default=None, help="Lightning precision (bf16-mixed; 32-true)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--timeout", type=float, default=180, help="seconds allowed per training")
    parser.add_argument("--out", default=None, help="folder for logs and results (default runs/bench_multi_gpu)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, CPU processes on gloo, fp32")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    smoke = args.cpu_smoke
    args.preset = args.preset or ("hybrid-tiny" if smoke else "hybrid-130m")
    args.steps = args.steps or (6 if smoke else 40)
    args.global_batch = args.global_batch or (4 if smoke else 16)
    args.seq_len = args.seq_len or (64 if smoke else 1024)
    args.precision = args.precision or ("32-true" if smoke else "bf16-mixed")
    if args.worker:
        worker(args)
        return

    import torch

    if not smoke and torch.cuda.device_count() < args.devices:
        raise SystemExit(f"--devices {args.devices} needs as many GPUs; this machine has {torch.cuda.device_count()} "
                         "(use --cpu-smoke on a CPU machine)")
    if args.global_batch % args.devices:
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by --devices {args.devices}")
    strategies = (args.strategies or ("single,ddp,fsdp,fsdp+ac" if smoke else "single,ddp,fsdp")).split(",")
    for name in strategies:
        base, _, suffix = name.partition("+")
        if base not in ("single", "ddp", "fsdp") or suffix not in ("", "ac"):
            raise SystemExit(f"unknown strategy {name!r}: use single, ddp, fsdp, each optionally with +ac")
    if "single" not in strategies:
        strategies.insert(0, "single")  # the reference every row is compared with
    out = Path(args.out or ROOT / "runs" / "bench_multi_gpu")
    out.mkdir(parents=True, exist_ok=True)
    device = "CPU (gloo)" if smoke else torch.cuda.get_device_name(0)
    print(f"{args.preset}, {args.steps} steps, global batch {args.global_batch} x {args.seq_len} tokens, "
          f"{args.precision}, {device}")

    results = {}
    for name in strategies:
        world = 1 if name.startswith("single") else args.devices
        started = time.perf_counter()
        results[name] = launch(name, world, args, out)
        print(f"  {name}: {'done' if results[name] else 'failed'} in {time.perf_counter() - started:.0f} s", flush=True)

    reference = results.get("single")
    print("\n| strategy | devices | batch / device | global batch | loss step 1 | loss last 5 | max abs loss diff "
          "vs single | tokens/s | speed-up vs single | peak memory / device |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failures = []
    for name, r in results.items():
        if r is None:
            print(f"| {name} | failed | | | | | | | | |")
            failures.append(name)
            continue
        diff = (max(abs(a - b) for a, b in zip(r["losses"], reference["losses"]))
                if reference and name != "single" else 0.0)
        if smoke and diff > SMOKE_TOLERANCE:
            failures.append(f"{name} (loss differs by {diff:.2e})")
        speedup = r["tokens_per_s"] / reference["tokens_per_s"] if reference else math.nan
        memory = "" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f} GiB"
        print(f"| {name} | {r['devices']} | {r['per_device_batch']} | {r['global_batch']} | {r['losses'][0]:.4f} | "
              f"{statistics.fmean(r['losses'][-5:]):.4f} | {diff:.2e} | {r['tokens_per_s']:,.0f} | {speedup:.2f} | "
              f"{memory} |")
    if reference:
        print(f"\n{reference['parameters']:,} parameters; losses per step of single: "
              + " ".join(f"{v:.3f}" for v in reference["losses"]))
    if failures:
        raise SystemExit(f"failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
