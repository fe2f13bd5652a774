"""Loss curves of finished training runs, against training tokens, in one PNG.

    python scripts/plot_loss_curves.py runs/lm/compare-hybrid-130m runs/lm/compare-transformer++-125m \
        --out docs/lm/loss_130m.png [--title "..."] [--smooth 20]

Each run folder must hold the ``config.yaml`` that every training run saves (for ``batch_size`` and
``seq_len``: tokens per step) and Lightning's CSV log ``logs/metrics.csv`` (``train/loss`` and
``val/loss`` columns). Training loss is drawn thin, as a running mean over ``--smooth`` logged points,
validation loss thick with markers. Also prints each run's last validation loss. World size is read
from ``trainer.devices`` when it is an integer (tokens per step count every process).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import yaml


def tokens_per_step(run_dir: Path) -> int:
    """batch_size x seq_len x devices from the run's resolved config."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: is {run_dir} a training run folder?")
    cfg = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    devices = cfg.get("trainer", {}).get("devices", 1)
    world = devices if isinstance(devices, int) and devices > 0 else 1
    return int(cfg["batch_size"]) * int(cfg["seq_len"]) * world


def read_losses(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, val) lists of (step, loss) from ``logs/metrics.csv``; rows without the value are skipped."""
    log = run_dir / "logs" / "metrics.csv"
    if not log.is_file():
        raise FileNotFoundError(f"{log} is missing: the run wrote no CSV log (did it start?)")
    train, val = [], []
    with log.open(newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, out in (("train/loss", train), ("val/loss", val)):
                value = row.get(key)
                if value not in (None, ""):
                    out.append((int(step), float(value)))
    if not train and not val:
        raise ValueError(f"{log} has no train/loss or val/loss values")
    return train, val


def running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="")
    parser.add_argument("--smooth", type=int, default=20)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(args.runs):
        per_step = tokens_per_step(run)
        train, val = read_losses(run)
        color = f"C{i}"
        if train:
            steps, losses = zip(*train)
            ax.plot([s * per_step / 1e6 for s in steps], running_mean(list(losses), args.smooth),
                    color=color, lw=0.8, alpha=0.6)
        if val:
            steps, losses = zip(*val)
            ax.plot([s * per_step / 1e6 for s in steps], losses, color=color, lw=2, marker="o", ms=3,
                    label=f"{run.name} (val {losses[-1]:.3f})")
            print(f"{run.name}: last val loss {losses[-1]:.4f} (ppl {math.exp(losses[-1]):.2f}) "
                  f"at {steps[-1] * per_step / 1e6:.1f}M tokens")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(args.title or "validation (thick) and smoothed training (thin) loss")
    ax.grid(alpha=0.3)
    ax.legend()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
