"""Synthetic-task evaluations on one GPU within a wall-clock budget, and their Markdown tables.

    python scripts/gpu_evals.py run --task induction_heads-gpu --model mamba1 --out DIR \\
        --train-until EPOCH_S --eval-until EPOCH_S [hydra overrides ...]
    python scripts/gpu_evals.py tables DIR                       # one table per task, to stdout

``scripts/gpu_evals.sh`` starts one ``run`` per (task, model) as parallel processes sharing the GPU
(docs/evals.md, "Measured on an H100"). A ``run`` is ``python -m domains.lm task`` with two additions
that a shared, time-boxed GPU needs:

- **Steps sized to the clock.** The task config's ``steps`` is the cap. While the learning rate is still
  warming up, the run measures its own step rate (under whatever load the other processes put on the
  GPU and the CPUs) and sets the step count N so that training ends by ``--train-until``. The warm-up's
  learning rate does not depend on N, so the run is exactly ``python -m domains.lm task ...
  task.steps=N`` (the ``reproduce`` field of its results); if N comes out at or below the warm-up
  length the schedule never reaches its peak, and the results say so. A run still training at
  ``--train-until`` (the load grew after N was fixed) stops there and is marked ``truncated``.
- **Evaluation to a deadline.** Settings are scored in the config's order (increasing length for
  induction heads); a setting whose predicted time (from the last one's, scaled by tokens, and by
  length again for models with attention) would pass ``--eval-until`` is skipped and listed under
  ``skipped``. So "how far up the lengths did we get" is part of the results.

Each ``run`` rewrites ``DIR/<task>__<model>.json`` atomically after training and after every
evaluation setting, so a process killed from outside leaves what it had. Batches are drawn by a
background thread one step ahead (the same seeded batches as the CLI: batch ``s`` from seed
``run.seed * 1000003 + s``), which hides the CPU-heavy generators (MQAR's) behind the GPU step.

The five models (``MODELS``) are the families' ``-tiny`` presets at d_model 64 with the Mamba paper's
two sequence-mixer layers for the synthetic tasks: Mamba-1 ``SS``, Mamba-2 ``MM`` (the presets have four),
Transformer++ ``*-*-`` and Hyena ``H-H-`` (as the presets), and the hybrid as ``M*M``: hybrid-tiny's
Mamba-2 and attention mixers with one attention layer between two Mamba-2 layers and no MLP. The preset's
own six blocks (``M--*M-``, Megatron-LM's allocation) did not learn induction heads in 400 CPU steps
(accuracy 0.06, where ``MM`` reached 0.93, ``M*M`` 0.84, ``M-*M-`` 0.55 and ``M--M-`` 0.09: the two
adjacent MLP blocks stall it at this budget; docs/evals.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# The script runs from the repository root or from anywhere with the repository on sys.path.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (preset, Hydra overrides of the model group): every family at d_model 64, two sequence mixers.
MODELS: dict[str, tuple[str, list[str]]] = {
    "mamba1": ("mamba1-tiny", ["+model.overrides.pattern=SS"]),
    "mamba2": ("mamba2-tiny", ["+model.overrides.pattern=MM"]),
    "transformer++": ("transformer++-tiny", []),
    "hyena": ("hyena-tiny", []),
    "hybrid": ("hybrid-tiny", ["+model.overrides.pattern=M*M"]),
}

CALIBRATE_FROM = 10      # steps before this one include kernel compilation: not timed
RATE_WINDOW = 100        # the step rate is measured over (at most) the last this many steps
RECALIBRATE_EVERY = 10   # steps between re-estimates of N while the warm-up lasts


# --------------------------------------------------------------------------------------------------
# Results file
# --------------------------------------------------------------------------------------------------

def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def result_path(out: Path, task: str, model: str) -> Path:
    return out / f"{task}__{model}.json"


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

def compose_task(task: str, model: str, extra: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The composed ``configs/lm/task.yaml`` as a plain dict, and the CLI overrides that give it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from core.cli import CONFIG_ROOT

    if model not in MODELS:
        raise SystemExit(f"unknown model {model!r}; choose one of {list(MODELS)}")
    preset, model_overrides = MODELS[model]
    cli = [f"task={task}", f"model={preset}", *model_overrides, *extra]
    # run.name interpolates hydra's runtime choices, which exist only under @hydra.main.
    overrides = [*cli, f"run.name={task}-{model}", "run.dir=null"]
    with initialize_config_dir(config_dir=str(CONFIG_ROOT / "lm"), version_base="1.3"):
        cfg = compose("task", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True), cli


# --------------------------------------------------------------------------------------------------
# Training: the CLI's loop (domains.lm.tasks.common.train_on_task) with N set by the clock
# --------------------------------------------------------------------------------------------------

class Prefetcher:
    """Draws ``make_batch(step)`` for steps 0, 1, ... in a background thread, ``depth`` steps ahead."""

    def __init__(self, make_batch: Callable[[int], Any], depth: int = 3) -> None:
        self._make_batch = make_batch
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        step = 0
        while not self._stop.is_set():
            try:
                item = (step, self._make_batch(step), None)
            except Exception as error:  # handed to the consumer, which raises it
                item = (step, None, error)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def get(self, step: int) -> Any:
        got, batch, error = self._queue.get()
        if error is not None:
            raise error
        if got != step:
            raise RuntimeError(f"prefetcher out of order: wanted step {step}, got {got}")
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def train_to_deadline(model: Any, make_batch: Callable[[int], Any], max_steps: int, optim: Any,
                      train_until: float, grad_clip: float, device: Any, safety: float,
                      log_every: int = 100) -> dict[str, Any]:
    """Train like ``train_on_task`` for N <= ``max_steps`` steps, N chosen during the warm-up so that
    training ends by ``train_until`` (a ``time.time()`` value). Returns losses and the timing facts."""
    from domains.lm.tasks.common import task_optimizer, task_step

    optim.max_steps = max_steps
    model.train()
    # The schedule reads optim.max_steps when called, so N can change until the warm-up ends.
    optimizer, scheduler = task_optimizer(model, optim)
    losses: list[float] = []
    stamps: list[float] = []       # time.time() after each step
    planned, truncated = max_steps, False
    started = time.time()
    batches = Prefetcher(make_batch)
    try:
        step = 0
        while step < planned:
            if time.time() >= train_until:
                truncated = True
                break
            # task_step's loss is a host float: it waits for the GPU, so the stamps are true
            losses.append(task_step(model, batches.get(step).to(device), optimizer, scheduler, grad_clip))
            stamps.append(time.time())
            step += 1
            if step < optim.warmup_steps and step >= CALIBRATE_FROM + RECALIBRATE_EVERY \
                    and step % RECALIBRATE_EVERY == 0:
                first = max(CALIBRATE_FROM, step - RATE_WINDOW)
                per_step = (stamps[step - 1] - stamps[first - 1]) / (step - first)
                fit = int(safety * (train_until - stamps[-1]) / per_step)
                planned = max(step, min(max_steps, step + fit))
                optim.max_steps = planned
            if log_every and (step % log_every == 0 or step == planned):
                recent = losses[-log_every:]
                print(f"step {step:6d}/{planned}  loss {sum(recent) / len(recent):.4f}  "
                      f"lr {scheduler.get_last_lr()[0]:.2e}  {time.time() - started:.0f} s", flush=True)
    finally:
        batches.close()
    model.eval()
    done = len(losses)
    timed = stamps[CALIBRATE_FROM - 1:] if done > CALIBRATE_FROM else stamps
    per_step = (timed[-1] - timed[0]) / (len(timed) - 1) if len(timed) > 1 else None
    return {"losses": losses, "steps": done, "planned_steps": planned, "truncated": truncated,
            "train_seconds": (stamps[-1] if stamps else time.time()) - started, "seconds_per_step": per_step}


# --------------------------------------------------------------------------------------------------
# Evaluation to a deadline
# --------------------------------------------------------------------------------------------------

def eval_cost(seq_len: int, samples: int, attention: bool) -> float:
    """Relative cost of scoring ``samples`` sequences of ``seq_len``: tokens, times the length again
    (in units of 2048, where attention starts to dominate a d_model-64 model) for models with attention."""
    tokens = float(seq_len) * samples
    return tokens * (1.0 + seq_len / 2048.0) if attention else tokens


def scored_samples(seq_len: int, num_samples: int, max_tokens: int | None) -> int:
    """How many sequences ``evaluate_settings`` scores for one setting (its rule, repeated here to predict)."""
    if max_tokens:
        return max(min(8, num_samples), min(num_samples, max_tokens // seq_len))
    return num_samples


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> None:
    import torch

    from domains.lm.tasks.common import evaluate_settings, prepare_task_run, seeded

    c, cli = compose_task(args.task, args.model, args.overrides)
    run = prepare_task_run(c)
    task_cfg, task, model, model_config = run.task_cfg, run.task, run.model, run.model_config
    device, seed, eval_settings, optim, make_batch = run.device, run.seed, run.eval_settings, run.optim, run.make_batch
    train_settings, batch_size, cap = run.train_settings, run.batch_size, run.optim.max_steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = result_path(out, args.task, args.model)
    lengths = [task.generate(1, seeded(0), **s).input_ids.shape[1] for s in eval_settings]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.task} / {args.model}: vocab {run.vocab}, pattern {model_config.pattern!r}, "
          f"{model.num_parameters():,} parameters, {device_name}", flush=True)

    results: dict[str, Any] = {
        "task": task_cfg["name"], "model": args.model, "preset": model_config.name,
        "pattern": model_config.pattern, "d_model": model_config.d_model, "parameters": model.num_parameters(),
        "batch_size": batch_size, "seed": seed, "lr": optim.lr, "warmup_steps": optim.warmup_steps,
        "steps_cap": cap, "device": device_name, "train": train_settings, "status": "training", "rows": [],
        "skipped": [],
    }
    write_json(path, results)
    trained = train_to_deadline(model, make_batch, cap, optim, args.train_until,
                                float(task_cfg.get("grad_clip", 1.0)), device, args.safety)
    losses = trained.pop("losses")
    tail = losses[-20:]
    reproduce = "python -m domains.lm task " + shlex.join([*cli, f"task.steps={trained['steps']}"])
    results.update(trained, status="evaluating", final_loss=sum(tail) / len(tail) if tail else None,
                   warmup_completed=trained["steps"] > optim.warmup_steps,
                   loss_curve=[round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 4)
                               for i in range(0, len(losses), 100)],
                   reproduce=reproduce if not trained["truncated"] else None)
    write_json(path, results)
    rate = f"{trained['seconds_per_step'] * 1000:.1f} ms/step" if trained["seconds_per_step"] else "no rate"
    print(f"trained {trained['steps']} steps (planned {trained['planned_steps']}, {rate}) "
          f"in {trained['train_seconds']:.0f} s; evaluating", flush=True)

    ev = task_cfg["eval_options"]
    num_samples, eval_batch, max_tokens = int(ev["samples"]), int(ev["batch_size"]), ev.get("max_tokens")
    attention = "*" in model_config.pattern
    last: tuple[float, float] | None = None   # (cost, seconds) of the last setting scored
    for index, (params, length) in enumerate(zip(eval_settings, lengths)):
        cost = eval_cost(length, scored_samples(length, num_samples, max_tokens), attention)
        if last is not None:
            predicted = last[1] * cost / last[0]
            if time.time() + predicted > args.eval_until:
                results["skipped"].append({"setting": task.describe(**params), "seq_len": length,
                                           "predicted_seconds": predicted})
                continue
        elif time.time() > args.eval_until:
            results["skipped"].append({"setting": task.describe(**params), "seq_len": length})
            continue
        # evaluate_settings seeds setting i with seed + offset + i: passing seed + index and one setting
        # scores exactly the sequences the CLI would.
        row = evaluate_settings(model, task, [params], num_samples, seed + index, eval_batch, max_tokens)[0]
        last = (cost, max(row["seconds"], 1e-3))
        results["rows"].append(row)
        write_json(path, results)
    if device.type == "cuda":
        results["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    results["status"] = "done"
    write_json(path, results)
    print(f"done: {len(results['rows'])} settings scored, {len(results['skipped'])} skipped", flush=True)


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------

def _column(row: dict[str, Any], task_module: str) -> str:
    if task_module == "induction_heads":
        return f"2^{int(math.log2(row['seq_len']))}"
    return row["setting"]


def tables(folder: Path) -> str:
    """One Markdown table per task from the ``<task>__<model>.json`` files in ``folder``."""
    found = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*__*.json"))]
    if not found:
        return f"(no results in {folder})\n"
    order = list(MODELS)
    parts = []
    for task in sorted({r["task"] for r in found}):
        rows = sorted((r for r in found if r["task"] == task),
                      key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))
        module = "induction_heads" if task.startswith("induction_heads") else task
        columns: list[str] = []
        for r in rows:
            for row in r["rows"]:
                if _column(row, module) not in columns:
                    columns.append(_column(row, module))
            for skip in r.get("skipped", []):
                name = _column(skip, module) if module == "induction_heads" else skip["setting"]
                if name not in columns:
                    columns.append(name)
        if module == "induction_heads":
            columns.sort(key=lambda name: int(name.split("^")[1]))
        head = ["model", "pattern", "params", *columns, "steps", "ms/step", "final loss"]
        lines = [f"#### {task}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            acc = {_column(row, module): f"{row['accuracy']:.2f}" for row in r["rows"]}
            for skip in r.get("skipped", []):  # not scored: the evaluation deadline came first
                acc[_column(skip, module) if module == "induction_heads" else skip["setting"]] = "time"
            steps = r.get("steps")
            note = ""
            if r.get("truncated"):
                note = f" (cut at {steps} of {r.get('planned_steps')})"
            elif r.get("status") != "done":
                note = f" ({r.get('status')})"
            cells = [r["model"], f"`{r['pattern']}`", f"{r['parameters']:,}",
                     *[acc.get(col, "-") for col in columns],
                     f"{steps if steps is not None else '-'}{note}",
                     f"{r['seconds_per_step'] * 1000:.0f}" if r.get("seconds_per_step") else "-",
                     f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train one model on one task to a deadline, then evaluate to another")
    r.add_argument("--task", required=True, help="a config of configs/lm/task/, e.g. induction_heads-gpu")
    r.add_argument("--model", required=True, choices=list(MODELS))
    r.add_argument("--out", required=True, help="folder for <task>__<model>.json")
    r.add_argument("--train-until", type=float, required=True, help="time.time() by which training ends")
    r.add_argument("--eval-until", type=float, required=True, help="time.time() by which evaluation ends")
    r.add_argument("--safety", type=float, default=0.9, help="fraction of the remaining time N is sized to")
    r.add_argument("overrides", nargs="*", help="Hydra overrides of configs/lm/task.yaml")
    t = sub.add_parser("tables", help="Markdown tables of a results folder")
    t.add_argument("folder")
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.eval_until < args.train_until:
            raise SystemExit("--eval-until must not be before --train-until")
        run(args)
    else:
        sys.stdout.write(tables(Path(args.folder)))


if __name__ == "__main__":
    main()
