"""The audio results of docs/audio.md in one time-boxed GPU call: the helper of scripts/gpu_audio.sh.

    python scripts/gpu_audio.py pack   [--digits-train-voices 110] [--music-seconds 150]   # here, before the call
    python scripts/gpu_audio.py job    --name N --results DIR --train-until EPOCH [...] -- <train overrides>
    python scripts/gpu_audio.py report --results DIR --out DIR

``pack`` writes ``.audio_data/`` (git-ignored, carried to the GPU machine, which has neither espeak-ng nor
fluidsynth): the prepared digits and music caches re-encoded as FLAC (lossless; their manifests point at
the .flac files, which ``PreparedAudio.load`` reads like WAVs), the digits' training split cut to a subset
of its voices so that the whole upload stays under the device's 64 MiB (validation and test are whole;
the global scale stays the full training split's peak), and the wheels the GPU machine lacks.

``job`` is one ``domains.audio.train`` run with a wall-clock budget, then its NLL on the test split at
several contexts and, optionally, unconditional samples. The suite's trainer stops at ``max_steps``
only; here :class:`WallClockBudget` sets the step count (and with it the cosine schedule's length) from
the measured step rate so that training ends by ``--train-until``, the same count for every member of a
``--group`` (equal samples seen across the models compared), and stops at the deadline regardless.

``report`` turns the jobs' JSON records into the markdown tables, the NLL-vs-context plot and (with
``--curves``) the training-loss curves against samples seen.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# What the GPU machine's image lacks (KINDS.md's package list): soundfile and cffi, through which soundfile
# loads its bundled libsndfile, and Hydra.
WHEELS = ("soundfile-", "cffi-", "pycparser-", "hydra_core-", "omegaconf-", "antlr4_python3_runtime-")


def compose_config(command: str, overrides: list[str]) -> Any:
    """The Hydra config of ``python -m domains.audio <command> <overrides>`` (typos fail as in the CLI)."""
    from hydra import compose, initialize_config_dir

    from core.cli import CONFIG_ROOT

    with initialize_config_dir(config_dir=str(CONFIG_ROOT / "audio"), version_base="1.3"):
        return compose(command, overrides=overrides)


def write_json(path: Path, data: dict[str, Any]) -> None:
    from core.checkpoint import atomic_write

    text = json.dumps(data, indent=1, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# pack: the carried data
# --------------------------------------------------------------------------------------------------

def _flac_copy(source: Path, target: Path) -> None:
    """Re-encode a 16-bit WAV as FLAC and check that it decodes to the same samples."""
    import numpy as np
    import soundfile as sf

    x, rate = sf.read(str(source), dtype="int16")
    target.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(target), x, rate, format="FLAC", subtype="PCM_16")
    y, _ = sf.read(str(target), dtype="int16")
    if not np.array_equal(x, y):
        raise RuntimeError(f"FLAC copy of {source} does not decode to its samples")


def pack_prepared(folder: Path, out_root: Path, keep_train_groups: int | None, seed: int) -> dict[str, Any]:
    """Copy a prepared data folder (``data_cache/audio/<key>``) under ``out_root`` as FLAC, keeping
    ``keep_train_groups`` of the training split's groups (voices; None: all). Returns a summary."""
    manifest = json.loads((folder / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    groups = sorted({e["group"] for e in train})
    kept = set(groups)
    if keep_train_groups is not None and keep_train_groups < len(groups):
        order = groups[:]
        random.Random(seed).shuffle(order)
        kept = set(order[:keep_train_groups])
    manifest["splits"]["train"] = [e for e in train if e["group"] in kept]
    target = out_root / folder.name
    jobs = []
    for split in manifest["splits"].values():
        for entry in split:
            rel = Path(entry["path"])
            if rel.is_absolute():
                raise ValueError(f"{folder}: entry {rel} is outside the prepared folder; only synthesized "
                                 "sources (digits, music) can be packed")
            entry["path"] = str(rel.with_suffix(".flac"))
            jobs.append((folder / rel, target / entry["path"]))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(lambda pair: _flac_copy(*pair), jobs))
    manifest["carried"] = {"train_groups_kept": len(kept), "train_groups_total": len(groups),
                           "note": "FLAC copies of the prepared WAVs; the scale is the full training split's peak"}
    write_json(target / "manifest.json", manifest)
    frames = {s: sum(e["frames"] for e in v) for s, v in manifest["splits"].items()}
    return {"folder": folder.name, "clips": {s: len(v) for s, v in manifest["splits"].items()},
            "minutes": {s: round(f / manifest["sample_rate"] / 60, 2) for s, f in frames.items()},
            "train_groups_kept": len(kept), "train_groups_total": len(groups)}


def pack(args: argparse.Namespace) -> None:
    from domains.audio.data import prepare
    from omegaconf import OmegaConf

    out = REPO / args.out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "whl").mkdir(parents=True)
    for folder in args.wheels:
        for wheel in sorted((REPO / folder).glob("*.whl")):
            if wheel.name.startswith(WHEELS) and not (tmp / "whl" / wheel.name).exists():
                shutil.copy2(wheel, tmp / "whl" / wheel.name)
    missing = [w for w in WHEELS if not any(p.name.startswith(w) for p in (tmp / "whl").iterdir())]
    if missing:
        raise FileNotFoundError(f"no wheel for {missing} in {args.wheels}; download them for Python 3.12, "
                                "e.g. pip download --no-deps --only-binary=:all: --python-version 3.12 "
                                "--implementation cp --platform manylinux2014_x86_64 -d .audio_whl cffi pycparser")
    summary: dict[str, Any] = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "data": []}
    datasets = [(["data=digits", "data.clips_per_voice=1"], args.digits_train_voices),
                (["data=music", f"data.max_seconds={args.music_seconds}"], None)]
    for overrides, keep in datasets:
        cfg = compose_config("prepare", overrides)
        data = prepare(OmegaConf.to_container(cfg.data, resolve=True))
        info = pack_prepared(data.folder, tmp / "data_cache" / "audio", keep, seed=int(cfg.data.seed))
        info["overrides"] = overrides
        summary["data"].append(info)
        print(json.dumps(info))
    write_json(tmp / "PACKED.json", summary)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB")


# --------------------------------------------------------------------------------------------------
# job: train with a wall-clock budget, evaluate, sample
# --------------------------------------------------------------------------------------------------

def _budget_callback_class() -> type:
    import lightning as L

    class WallClockBudget(L.Callback):
        """Fits the run's step count to a deadline (epoch seconds ``until``), equal across a group.

        Every ``every`` steps after the first ``skip`` (compilation, warm-up) it measures the step rate over
        the last ``window`` seconds and projects the step reached at the deadline (times ``safety``), and
        posts that projection in ``group_dir``. The horizon is the smallest of the posted projections of
        the live members and the final steps of the finished ones, so models trained side by side see
        the same number of samples. At its first projection a member waits (at most ``barrier_seconds``;
        the GPU serves the others meanwhile) until all ``group_size`` members have posted: otherwise a fast
        member could pass the step count of a slow one before the slow one has measured its rate. The
        horizon may grow only while under ``grow_until`` of the way (so the cosine does not stretch late in
        the run), shrinks whenever the bound falls, and is written to both the loop's ``max_steps`` and the
        optimizer config that the learning-rate schedule reads. At the deadline the run stops. A member
        whose rate collapses late must stop below the others' count: the deadline wins over equality."""

        def __init__(self, until: float, name: str, group_dir: Path | None, cap: int, min_steps: int,
                     group_size: int = 1, barrier_seconds: float = 60.0, every: int = 10, skip: int = 10,
                     window: float = 60.0, safety: float = 0.97, grow_until: float = 0.7) -> None:
            self.until, self.name, self.group_dir, self.cap, self.min_steps = until, name, group_dir, cap, min_steps
            self.group_size, self.barrier_seconds = group_size, barrier_seconds
            self.every, self.skip, self.window, self.safety, self.grow_until = every, skip, window, safety, grow_until
            self.times: deque[tuple[int, float]] = deque()
            self.horizon = cap
            self.history: list[dict[str, Any]] = []
            self.stop_reason = "max_steps"
            self.first_step_time: float | None = None
            self.barrier_wait: float | None = None

        def _post(self, projected: int | None, final: int | None = None, done: bool = False) -> None:
            """Post this member's projection, or (done) its final step: None for a failed run, which then
            bounds no one."""
            if self.group_dir is None:
                return
            self.group_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.group_dir / f"{self.name}.json",
                       {"projected": projected, "done": done or final is not None, "final": final, "time": time.time()})

        def _posts(self) -> list[dict[str, Any]]:
            posts = []
            for path in sorted(self.group_dir.glob("*.json")) if self.group_dir is not None else []:
                try:
                    posts.append(json.loads(path.read_text()))
                except (OSError, json.JSONDecodeError):  # a member writing right now: read it next time
                    continue
            return posts

        def _group_bound(self, own: int) -> int:
            bound = own
            for post in self._posts():
                value = post.get("final") if post.get("done") else post.get("projected")
                if value is not None:
                    bound = min(bound, int(value))
            return bound

        def _barrier(self) -> None:
            started = time.time()
            while time.time() < min(started + self.barrier_seconds, self.until):
                if len(self._posts()) >= self.group_size:
                    break
                time.sleep(0.5)
            self.barrier_wait = time.time() - started
            self.times.clear()  # the wait is no measure of the step rate

        def _apply(self, trainer: Any, module: Any, horizon: int) -> None:
            self.horizon = horizon
            trainer.fit_loop.epoch_loop.max_steps = horizon
            module.optim_config.max_steps = horizon  # lr_lambda reads this object at every step

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            now, step = time.time(), int(trainer.global_step)
            if self.first_step_time is None:
                self.first_step_time = now
            if now >= self.until:
                trainer.should_stop = True
                self.stop_reason = "deadline"
                return
            if step < self.skip:
                return
            self.times.append((step, now))
            while len(self.times) > 2 and now - self.times[0][1] > self.window:
                self.times.popleft()
            if step % self.every or len(self.times) < 2:
                return
            (s0, t0), (s1, t1) = self.times[0], self.times[-1]
            if s1 == s0 or t1 <= t0:
                return
            rate = (s1 - s0) / (t1 - t0)
            projected = int(step + rate * (self.until - now) * self.safety)
            self._post(projected)
            if self.barrier_wait is None:
                self._barrier()
                now = time.time()
                projected = int(step + rate * (self.until - now) * self.safety)
                self._post(projected)
            target = max(step + 1, min(self.cap, max(self.min_steps, self._group_bound(projected))))
            if target < self.horizon or (target > self.horizon and step < self.grow_until * self.horizon):
                self._apply(trainer, module, target)
                self.history.append({"step": step, "rate": round(rate, 3), "projected": projected, "horizon": target,
                                     "seconds_left": round(self.until - now, 1)})

        def on_train_end(self, trainer: Any, module: Any) -> None:
            self._post(None, final=int(trainer.global_step))

    return WallClockBudget


@contextmanager
def trainer_callbacks(callbacks: list[Any]) -> Iterator[None]:
    """``domains.audio.train`` with these callbacks added to the Trainer it builds."""
    import domains.audio.train as audio_train

    original = audio_train.build_trainer

    def build(trainer_cfg: Any, run_dir: Any, extra_callbacks: list[Any] | None = None) -> Any:
        return original(trainer_cfg, run_dir, [*(extra_callbacks or []), *callbacks])

    audio_train.build_trainer = build
    try:
        yield
    finally:
        audio_train.build_trainer = original


def evaluate_contexts(run_dir: Path, data_cfg: dict[str, Any], split: str, contexts: list[int],
                      eval_tokens: int, max_windows: int | None = None) -> dict[int, dict[str, float]]:
    """Bits per sample of the run's export on every clip of ``split``, whole, cut into consecutive
    windows of each context scored from an empty state (the same samples at every context).
    ``max_windows`` (smoke runs only) keeps the first windows, which breaks that equality."""
    import torch

    from domains.audio.data import Quantization, Windows, prepare
    from domains.audio.evaluate import nll_bits
    from domains.audio.model import load_audio_export, pick_device

    device = pick_device("auto")
    model, meta = load_audio_export(run_dir, device)
    data = prepare(data_cfg)
    data.manifest["scale"] = meta["audio"]["scale"]
    quant = Quantization(str(meta["audio"]["scheme"]), int(meta["audio"]["bits"]))
    out: dict[int, dict[str, float]] = {}
    for context in contexts:
        started = time.perf_counter()
        windows = Windows(data, split, int(context), quant)
        if max_windows:
            windows.index = windows.index[:max_windows]
        bits, count = nll_bits(model, windows, max(1, eval_tokens // int(context)), device)
        out[int(context)] = {"bits_per_sample": bits, "samples": count, "seconds": time.perf_counter() - started}
        print(f"{split} NLL at context {context}: {bits:.4f} bits/sample over {count} samples", flush=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def job(args: argparse.Namespace, overrides: list[str]) -> None:
    import torch
    from omegaconf import OmegaConf

    from domains.audio.sample import sample
    from domains.audio.train import train

    results, runs = Path(args.results), Path(args.runs)
    results.mkdir(parents=True, exist_ok=True)
    run_dir = runs / args.name
    record_path = results / f"{args.name}.json"
    cfg = compose_config("train", [*overrides, f"run.name={args.name}", f"run.dir={run_dir}",
                                   f"trainer.max_steps={args.max_steps}", f"trainer.val_check_interval={args.max_steps}"])
    budget = _budget_callback_class()(until=args.train_until, name=args.name,
                                      group_dir=Path(args.group_dir) / args.group if args.group else None,
                                      cap=args.max_steps, min_steps=args.min_steps, group_size=args.group_size)
    record: dict[str, Any] = {"name": args.name, "group": args.group, "family": args.family,
                              "overrides": overrides, "seq_len": int(cfg.seq_len), "batch_size": int(cfg.batch_size),
                              "model": OmegaConf.to_container(cfg.model, resolve=True),
                              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                              "precision": str(cfg.trainer.precision), "started": time.time()}
    write_json(record_path, {**record, "status": "training"})
    try:
        with trainer_callbacks([budget]):
            metrics = train(cfg)
    except BaseException as error:  # record it, so that the report and the jobs waiting on this one go on
        budget._post(None, done=True)
        write_json(record_path, {**record, "status": "failed", "error": f"{type(error).__name__}: {error}"})
        raise
    record.update({"steps": int(metrics["steps"]), "parameters": int(metrics["parameters"]),
                   "train_seconds": metrics["train_seconds"], "val_bits_per_sample": metrics["val_bits_per_sample"],
                   "samples_seen": int(metrics["steps"]) * int(cfg.batch_size) * int(cfg.seq_len),
                   "stop_reason": budget.stop_reason, "budget_history": budget.history,
                   "barrier_wait_seconds": budget.barrier_wait,
                   "seconds_to_first_step": None if budget.first_step_time is None
                   else budget.first_step_time - record["started"],
                   "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None})
    write_json(record_path, {**record, "status": "evaluating"})
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    record["test"] = evaluate_contexts(run_dir, data_cfg, "test", args.eval_contexts, args.eval_tokens,
                                       args.eval_max_windows)
    record["status"] = "done"
    record["finished"] = time.time()
    write_json(record_path, record)

    if args.generate:
        # Decoding is latency-bound (one sample a step): wait until the trainings sharing the GPU are over.
        waited = time.time()
        names = [n for n in args.wait_for.split(",") if n]
        while time.time() < args.wait_until:
            states = [_status(results / f"{n}.json") for n in names]
            if all(s in ("done", "failed") for s in states):
                break
            time.sleep(2)
        record["generation_waited_seconds"] = time.time() - waited
        out_dir = Path(args.samples) / args.name
        gen = compose_config("generate", [f"checkpoint={run_dir}", f"out_dir={out_dir}", f"num_samples={args.generate}",
                                          f"batch_size={args.generate}", f"seconds={args.seconds}", "seed=0",
                                          "spectrogram=true", "spectrogram_rows=4"])
        started = time.perf_counter()
        paths = sample(gen)
        elapsed = time.perf_counter() - started
        record["generation"] = {"samples": len(paths), "seconds_each": args.seconds, "wall_seconds": elapsed,
                                "samples_per_second": len(paths) * args.seconds * 16000 / elapsed,
                                "folder": str(out_dir)}
        write_json(record_path, record)


def _status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------------------------------
# report: tables and the plot
# --------------------------------------------------------------------------------------------------

def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} K"


def report(args: argparse.Namespace) -> None:
    results = Path(args.results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for path in sorted(results.glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            print(f"skipping {path}: {error}")
    lines: list[str] = []
    done = [r for r in records if r.get("status") == "done"]
    unfinished = [f"{r['name']} ({r.get('status')})" for r in records if r.get("status") != "done"]
    if unfinished:
        lines += [f"Unfinished jobs: {', '.join(unfinished)}", ""]
    for group in sorted({r["group"] for r in done}):
        rows = sorted((r for r in done if r["group"] == group), key=lambda r: (r["family"], r["seq_len"]))
        contexts = sorted({int(c) for r in rows for c in r["test"]})
        head = ["model", "params", "context", "batch", "steps", "samples seen", "train s", "stop", "val bits"]
        head += [f"test @ {c} ({c / 16000:g} s)" for c in contexts]
        if any("generation" in r for r in rows):
            head += ["sampling"]
        lines += [f"### {group}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["family"], _fmt_params(r["parameters"]), f"{r['seq_len']} ({r['seq_len'] / 16000:g} s)",
                     str(r["batch_size"]), str(r["steps"]), f"{r['samples_seen'] / 1e6:.1f} M",
                     f"{r['train_seconds']:.0f}", r["stop_reason"], f"{r['val_bits_per_sample']:.3f}"]
            cells += [f"{r['test'][str(c)]['bits_per_sample']:.3f}" if str(c) in r["test"] else "-" for c in contexts]
            if any("generation" in x for x in rows):
                g = r.get("generation")
                cells += [f"{g['samples']} x {g['seconds_each']:g} s in {g['wall_seconds']:.0f} s" if g else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if len({r["seq_len"] for r in rows}) > 1:
            _plot_context(rows, out / f"{group}_nll_vs_context.png", group)
            lines += [f"![{group}]({group}_nll_vs_context.png)", ""]
        if args.curves and _plot_curves(rows, Path(args.curves), out / f"{group}_curves.png", group):
            lines += [f"![{group} training curves]({group}_curves.png)", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n")
    print(text)


def _plot_context(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Test NLL at the training context against the training context, one line per family, each point
    labelled with its steps (equal within the group only when the budget could keep them so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for index, family in enumerate(sorted({r["family"] for r in rows})):
        own = sorted((r for r in rows if r["family"] == family), key=lambda r: r["seq_len"])
        xs = [r["seq_len"] / 16000 for r in own]
        ys = [r["test"][str(r["seq_len"])]["bits_per_sample"] for r in own]
        label = f"{family} ({_fmt_params(own[0]['parameters'])})"
        ax.plot(xs, ys, marker="o", label=label)
        for x, y, r in zip(xs, ys, own):
            ax.annotate(f"{r['steps']} steps", (x, y), textcoords="offset points", xytext=(4, 5 - 14 * (index % 2)),
                        fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training context (seconds at 16 kHz)")
    ax.set_ylabel("test NLL (bits / sample)")
    ax.set_title(f"{title}: {own[0]['batch_size'] * own[0]['seq_len']:,} samples per step", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_curves(rows: list[dict[str, Any]], curves: Path, path: Path, title: str) -> bool:
    """Training loss (bits / sample, as logged every few steps) against samples seen, one line per run
    (the runs' Lightning CSV logs, named ``<curves>/<run name>.csv``). False when no log is there."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    for r in rows:
        log = curves / f"{r['name']}.csv"
        if not log.is_file():
            continue
        with log.open() as handle:
            points = [(int(row["step"]) + 1, float(row["train/loss"])) for row in csv.DictReader(handle)
                      if row.get("train/loss")]
        if not points:
            continue
        per_step = r["batch_size"] * r["seq_len"]
        ax.plot([s * per_step / 1e6 for s, _ in points], [loss / math.log(2) for _, loss in points],
                label=f"{r['family']}, {r['seq_len'] / 16000:g} s", linestyle="-" if r["family"] == "mamba" else "--")
        drawn = True
    if drawn:
        ax.set_xlabel("training samples seen (millions)")
        ax.set_ylabel("training loss (bits / sample)")
        ax.set_title(f"{title}: training loss", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
    plt.close(fig)
    return drawn


# --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write .audio_data/ (FLAC data caches and wheels) for the GPU machine")
    p.add_argument("--out", default=".audio_data")
    p.add_argument("--wheels", nargs="+", default=[".whl", ".audio_whl"], help="folders of wheels to take")
    p.add_argument("--digits-train-voices", type=int, default=110)
    p.add_argument("--music-seconds", type=int, default=150)
    p = sub.add_parser("job", help="one time-boxed training + test NLL (+ samples); train overrides after --")
    p.add_argument("--name", required=True)
    p.add_argument("--family", required=True)
    p.add_argument("--group", default="")
    p.add_argument("--group-dir", default="/tmp/gpu_audio/group")
    p.add_argument("--group-size", type=int, default=1, help="members of --group (all train side by side)")
    p.add_argument("--results", required=True)
    p.add_argument("--runs", required=True)
    p.add_argument("--samples", default="samples/audio")
    p.add_argument("--train-until", type=float, required=True, help="epoch seconds by which training ends")
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--min-steps", type=int, default=1)
    p.add_argument("--eval-contexts", type=lambda s: [int(x) for x in s.split(",")], default=[16000])
    p.add_argument("--eval-tokens", type=int, default=2**19, help="samples per evaluation batch")
    p.add_argument("--eval-max-windows", type=int, default=None, help="smoke runs: score only the first windows")
    p.add_argument("--generate", type=int, default=0, help="unconditional samples to draw after training")
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--wait-for", default="", help="jobs (comma-separated) whose end generation waits for")
    p.add_argument("--wait-until", type=float, default=0.0)
    p = sub.add_parser("report", help="markdown tables and plots of the jobs' records")
    p.add_argument("--results", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--curves", default=None, help="folder of the runs' metrics.csv, named <run>.csv")
    args = parser.parse_args(argv)
    if args.command != "job" and overrides:
        parser.error(f"{args.command} takes no overrides after --")
    {"pack": lambda: pack(args), "job": lambda: job(args, overrides), "report": lambda: report(args)}[args.command]()


if __name__ == "__main__":
    main()
