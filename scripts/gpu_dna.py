"""Helper of ``scripts/gpu_dna.sh``: one DNA command under a wall-clock deadline, and the report.

    python scripts/gpu_dna.py run --result R.json [--deadline EPOCH_S] -- <pretrain|eval|finetune> [overrides]
    python scripts/gpu_dna.py report --runs runs/gpu_dna --out OUT_DIR [--title "..."]

``run`` runs ``python -m domains.dna <command> ...`` in this process with three additions, none of
which changes what the config asks to compute:

- a deadline (seconds since the epoch): training stops after the step during which it passes, as if
  ``trainer.max_steps`` had been reached there (the LR schedule is the one of ``max_steps``); the
  command then goes on as usual (final val / test evaluation, export, test accuracy). Jobs that run
  side by side on one GPU share its time, so their speed is not known in advance: a deadline keeps a
  time-boxed job from losing everything to a kill. The step reached is recorded.
- the command's result dict (what ``pretrain`` / ``evaluate`` / ``finetune`` return) is written to
  ``--result`` as JSON (atomically), with the wall time, the step the deadline stopped at (or null),
  and the peak GPU memory.

``report`` reads every ``*.json`` under ``<runs>/results`` and the pretrain runs' own CSV logs (so a job
killed before its result still reports its training side), and writes ``report.md`` (tables),
``summary.json`` and three plots: bits per base at the training length against that length (the
Mamba paper's DNA context-scaling figure), perplexity of the same targets against the context each
model is given, and species accuracy against the window length.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON at ``path``, written under a temporary name and renamed (readers never see half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# run: one command with a deadline, its result saved
# --------------------------------------------------------------------------------------------------

def deadline_callback(deadline: float, every: int = 8) -> Any:
    """A Lightning callback that stops training after the step during which ``time.time()`` passes
    ``deadline``, and prints a progress line every ``every`` steps (step, loss, seconds since fit start)."""
    from lightning.pytorch.callbacks import Callback

    class DeadlineStop(Callback):
        def __init__(self) -> None:
            self.stopped_at: int | None = None
            self.started = time.time()

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.started = time.time()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            step = trainer.global_step
            if step % every == 0 or step == trainer.max_steps:
                loss = outputs["loss"].item() if isinstance(outputs, dict) and "loss" in outputs else float("nan")
                print(f"[deadline] step {step}/{trainer.max_steps} loss {loss:.4f} "
                      f"{time.time() - self.started:.1f} s", flush=True)
            if time.time() >= deadline and step < trainer.max_steps:
                self.stopped_at = step
                trainer.should_stop = True
                print(f"[deadline] wall-clock deadline reached: training stops at step {step} of "
                      f"{trainer.max_steps}", flush=True)

    return DeadlineStop()


def run(command: str, overrides: list[str], result_path: Path, deadline: float | None) -> int:
    import domains.dna.finetune as finetune_module
    import domains.dna.pretrain as pretrain_module
    from domains.dna import __main__ as cli

    callbacks: list[Any] = []
    if deadline is not None:
        callbacks.append(deadline_callback(deadline))
        original = pretrain_module.build_trainer

        def build_trainer(trainer_cfg: Any, run_dir: Any, extra_callbacks: list[Any] | None = None) -> Any:
            return original(trainer_cfg, run_dir, [*(extra_callbacks or []), *callbacks])

        # Both modules imported the name; each call site looks it up in its own module.
        pretrain_module.build_trainer = build_trainer
        finetune_module.build_trainer = build_trainer

    started = time.time()
    record: dict[str, Any] = {"command": command, "overrides": overrides, "started": started}

    def wrap(fn: Any) -> Any:
        def run_and_record(cfg: Any) -> None:
            import torch

            result = fn(cfg)
            record["result"] = result
            record["wall_seconds"] = time.time() - started
            record["deadline_stop_step"] = callbacks[0].stopped_at if callbacks else None
            if torch.cuda.is_available():
                record["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
                record["device"] = torch.cuda.get_device_name()
            write_json(result_path, record)

        return run_and_record

    inner = {"pretrain": pretrain_module.pretrain, "finetune": finetune_module.finetune}
    if command == "eval":
        from domains.dna.evaluate import evaluate

        inner["eval"] = evaluate
    if command not in inner:
        raise SystemExit(f"gpu_dna.py run: command {command!r} is not one of {sorted(inner)}")
    cli.COMMANDS[command] = wrap(inner[command])
    cli.main(["domains.dna", command, *overrides])
    if not result_path.is_file():
        print(f"gpu_dna.py run: {command} returned without a result ({result_path} not written)", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------

FAMILY_LABEL = {"mamba1": "Mamba-1", "hyena": "HyenaDNA"}


def family_of(preset: str) -> str:
    for key in FAMILY_LABEL:
        if preset.startswith(key):
            return key
    return preset


def option(overrides: list[str], key: str) -> str | None:
    """The value of ``key=...`` among Hydra overrides (the last one wins), or None."""
    value = None
    for item in overrides:
        if item.startswith(f"{key}="):
            value = item.split("=", 1)[1]
    return value


def fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def load_records(runs: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted((runs / "results").glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:  # a torn file cannot happen (atomic writes); say so if it does
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        record["file"] = path.name
        records.append(record)
    return records


def training_log(run_dir: Path, last: int = 16) -> dict[str, Any] | None:
    """What a pretrain run's own files say, whether or not the job finished: the resolved config and
    Lightning's CSV log (``train/loss`` every step: the mean over the ``last`` logged steps; the last
    in-training ``val/loss``, over ``trainer.limit_val_batches`` batches). None without both files."""
    import csv

    import yaml

    config, log = run_dir / "config.yaml", run_dir / "logs" / "metrics.csv"
    if not (config.is_file() and log.is_file()):
        return None
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    train, val = [], []
    with log.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                train.append((int(row["step"]), float(row["train/loss"])))
            if row.get("val/loss"):
                val.append((int(row["step"]), float(row["val/loss"])))
    tail = [loss for _, loss in train[-last:]]
    return {"run": run_dir.name, "preset": cfg["model"]["preset"], "seq_len": int(cfg["seq_len"]),
            "batch_size": int(cfg["batch_size"]), "max_steps": int(cfg["trainer"]["max_steps"]),
            "logged_steps": len(train), "train_loss_last": sum(tail) / len(tail) if tail else None,
            "train_loss_window": len(tail), "val_loss_in_training": val[-1][1] if val else None,
            "val_step": val[-1][0] + 1 if val else None}


def nats_to_bits(x: float | None) -> float | None:
    return None if x is None else x / math.log(2)


def collect(records: list[dict[str, Any]], runs: Path | None = None) -> dict[str, Any]:
    """Rows for the three tables, keyed and sorted (family, length). With ``runs``, every pretrain run
    folder under ``runs/pretrain`` adds its training-side numbers (:func:`training_log`), and a run whose
    job was killed before writing its result still gets a row."""
    pretrain, evals, species = [], [], []
    for rec in records:
        ov, res = rec["overrides"], rec.get("result") or {}
        if rec["command"] == "pretrain":
            preset = option(ov, "model")
            seq_len, batch = int(option(ov, "seq_len")), int(option(ov, "batch_size"))
            steps = int(res.get("steps", 0))
            pretrain.append({
                "family": family_of(preset), "preset": preset, "seq_len": seq_len, "batch_size": batch,
                "steps": steps, "max_steps": int(option(ov, "trainer.max_steps")), "tokens": steps * batch * seq_len,
                "parameters": int(res.get("parameters", 0)), "train_seconds": res.get("train_seconds"),
                "val_bits_per_base": res.get("val_bits_per_base"), "test_bits_per_base": res.get("test_bits_per_base"),
                "test_ppl": res.get("test_ppl"), "test_tokens": res.get("test_tokens"),
                "unigram_bits_per_base": res.get("test_unigram_bits_per_base"),
                "deadline_stop_step": rec.get("deadline_stop_step"), "peak_gpu_gib": rec.get("peak_gpu_gib"),
                "device": rec.get("device"), "run": option(ov, "run.dir"), "finished": True})
        elif rec["command"] == "eval":
            run = option(ov, "checkpoint")
            curve = {int(c): v for c, v in (res.get("context") or {}).items()}
            evals.append({"run": run, "seq_len": res.get("seq_len"), "bits_per_base": res.get("bits_per_base"),
                          "ppl": res.get("ppl"), "tokens": res.get("tokens"),
                          "score_len": int(option(ov, "score_len") or 0),
                          "max_windows": int(option(ov, "max_windows") or 0), "curve": curve})
        elif rec["command"] == "finetune":
            preset = Path(option(ov, "pretrained") or option(ov, "model") or "?").name
            species.append({"run": option(ov, "run.dir"), "pretrained": option(ov, "pretrained"),
                            "family": family_of(preset),
                            "window": int(res.get("window", option(ov, "task.window") or 0)),
                            "steps": res.get("steps"), "max_steps": int(option(ov, "trainer.max_steps")),
                            "batch_size": int(option(ov, "batch_size")), "test_acc": res.get("test_acc"),
                            "test_loss": res.get("test_loss"), "test_windows": res.get("test_windows"),
                            "train_seconds": res.get("train_seconds"), "parameters": res.get("parameters"),
                            "deadline_stop_step": rec.get("deadline_stop_step"), "peak_gpu_gib": rec.get("peak_gpu_gib")})
    by_name = {Path(p["run"]).name: p for p in pretrain}
    for run_dir in sorted((runs / "pretrain").glob("*")) if runs is not None else []:
        logged = training_log(run_dir)
        if logged is None:
            continue
        row = by_name.get(run_dir.name)
        if row is None:  # killed before its result: the training side only
            row = {"family": family_of(logged["preset"]), "preset": logged["preset"], "seq_len": logged["seq_len"],
                   "batch_size": logged["batch_size"], "steps": logged["logged_steps"], "max_steps": logged["max_steps"],
                   "tokens": logged["logged_steps"] * logged["batch_size"] * logged["seq_len"], "parameters": None,
                   "train_seconds": None, "val_bits_per_base": None, "test_bits_per_base": None, "test_ppl": None,
                   "test_tokens": None, "unigram_bits_per_base": None, "deadline_stop_step": None,
                   "peak_gpu_gib": None, "device": None, "run": str(run_dir), "finished": False}
            pretrain.append(row)
            by_name[run_dir.name] = row
        if not row["parameters"]:  # the job's log names the count before training starts
            job_log = runs / "logs" / f"pretrain-{run_dir.name}.log"
            found = re.search(r"([\d,]+) parameters", job_log.read_text(errors="replace")) if job_log.is_file() else None
            row["parameters"] = int(found.group(1).replace(",", "")) if found else None
        row["train_bits_last"] = nats_to_bits(logged["train_loss_last"])
        row["train_loss_window"] = logged["train_loss_window"]
        row["val_bits_in_training"] = nats_to_bits(logged["val_loss_in_training"])
        row["val_tokens_in_training"] = logged["batch_size"] * logged["seq_len"]  # limit_val_batches=1
    by_run = {p["run"]: p for p in pretrain}
    by_name = {Path(p["run"]).name: p for p in pretrain}
    for e in evals:
        p = by_run.get(e["run"]) or by_name.get(Path(e["run"]).name)
        e["family"], e["train_len"] = (p["family"], p["seq_len"]) if p else ("?", e["seq_len"])
    pretrain.sort(key=lambda r: (r["family"], r["seq_len"]))
    evals.sort(key=lambda r: (r["family"], r["train_len"] or 0))
    species.sort(key=lambda r: (r["family"], r["window"]))
    return {"pretrain": pretrain, "eval": evals, "species": species}


def binomial_halfwidth(p: float, n: int) -> float:
    """Half-width of a 95% normal-approximation interval for an accuracy p on n windows."""
    return 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def markdown(rows: dict[str, Any]) -> str:
    out = []
    pre = rows["pretrain"]
    if pre:
        def num(x: Any, f: str) -> str:
            return "-" if x is None else format(x, f)

        out += ["### Pretraining: bits per base at the training length", "",
                "train: the mean training loss of the last logged steps (fresh windows every step); val (1 batch): "
                "the in-training validation at the end, one batch of fixed windows (the same windows for both "
                "families at a length); val / test: the final evaluation on `eval_windows` fixed windows.", "",
                "| model | context | batch | steps (of max) | tokens | params | train | val (1 batch) | val | test | "
                "test ppl | peak GPU GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in pre:
            params = "-" if not r["parameters"] else f"{r['parameters']:,}"
            out.append(f"| {FAMILY_LABEL.get(r['family'], r['family'])} | {fmt_len(r['seq_len'])} | {r['batch_size']} | "
                       f"{r['steps']} ({r['max_steps']}) | {r['tokens'] / 1e6:.2f}M | {params} | "
                       f"{num(r.get('train_bits_last'), '.4f')} | {num(r.get('val_bits_in_training'), '.4f')} | "
                       f"{num(r['val_bits_per_base'], '.4f')} | {num(r['test_bits_per_base'], '.4f')} | "
                       f"{num(r['test_ppl'], '.4f')} | {num(r['peak_gpu_gib'], '.1f')} |")
        unfinished = [r for r in pre if r.get("finished") is False]
        if unfinished:
            out += ["", "Killed before the final evaluation (training-side numbers only): " +
                    ", ".join(f"{FAMILY_LABEL.get(r['family'], r['family'])} {fmt_len(r['seq_len'])}" for r in unfinished)
                    + "."]
        uni = next((r["unigram_bits_per_base"] for r in pre if r["unigram_bits_per_base"]), None)
        if uni:
            out += ["", f"Base composition alone: {uni:.4f} bits/base (ppl {2 ** uni:.4f}) on the test intervals."]
        out.append("")
    ev = [e for e in rows["eval"] if e["curve"]]
    if ev:
        contexts = sorted({c for e in ev for c in e["curve"]})
        score = ev[0]["score_len"]
        out += [f"### Perplexity of the same {score} target bases after each context", "",
                "| model (trained at) | " + " | ".join(fmt_len(c) for c in contexts) + " |",
                "|---|" + "---|" * len(contexts)]
        for e in ev:
            cells = [f"{e['curve'][c]['ppl']:.4f}" if c in e["curve"] else "" for c in contexts]
            out.append(f"| {FAMILY_LABEL.get(e['family'], e['family'])} ({fmt_len(e['train_len'])}) | " + " | ".join(cells) + " |")
        out.append("")
    sp = rows["species"]
    if sp:
        out += ["### Great Apes species (4 classes, chance 0.25), fine-tuned from the pretrained models", "",
                "| model | window | batch | steps (of max) | test accuracy (95% CI) | test loss | train s |",
                "|---|---|---|---|---|---|---|"]
        for r in sp:
            acc, n = r["test_acc"], r["test_windows"] or 0
            acc_s = "-" if acc is None else f"{acc:.3f} ± {binomial_halfwidth(acc, n):.3f} (n={n})"
            loss_s = "-" if r["test_loss"] is None else f"{r['test_loss']:.4f}"
            secs = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
            out.append(f"| {FAMILY_LABEL.get(r['family'], r['family'])} | {fmt_len(r['window'])} | {r['batch_size']} | "
                       f"{r['steps']} ({r['max_steps']}) | {acc_s} | {loss_s} | {secs} |")
        out.append("")
    return "\n".join(out)


def plots(rows: dict[str, Any], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"mamba1": "tab:blue", "hyena": "tab:orange"}
    written = []
    pre = rows["pretrain"]
    if pre:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        series = (("test_bits_per_base", "test", "-", "o"), ("val_bits_in_training", "val, 1 batch", "--", "s"),
                  ("train_bits_last", "train, last steps", ":", "^"))
        for fam in sorted({r["family"] for r in pre}):
            for key, what, style, marker in series:
                pts = [(r["seq_len"], r[key]) for r in pre if r["family"] == fam and r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), ls=style, marker=marker, color=colors.get(fam),
                            label=f"{FAMILY_LABEL.get(fam, fam)}, {what}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training sequence length (bases)")
        ax.set_ylabel("bits per base")
        ax.set_title(f"Pretrained at each length, equal tokens and steps\n{title}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "dna-bits-vs-seqlen.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    ev = [e for e in rows["eval"] if e["curve"]]
    if ev:
        fig, ax = plt.subplots(figsize=(6, 4))
        lengths = sorted({e["train_len"] for e in ev})
        for e in ev:
            pts = sorted((c, v["ppl"]) for c, v in e["curve"].items())
            shade = 0.35 + 0.65 * (lengths.index(e["train_len"]) + 1) / len(lengths)
            ax.plot(*zip(*pts), marker=".", color=colors.get(e["family"]), alpha=shade,
                    label=f"{FAMILY_LABEL.get(e['family'], e['family'])}, trained at {fmt_len(e['train_len'])}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context before the scored bases")
        ax.set_ylabel(f"perplexity of the same {ev[0]['score_len']} bases")
        ax.set_title(f"Same targets, growing context\n{title}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "dna-ppl-vs-context.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    sp = [r for r in rows["species"] if r["test_acc"] is not None]
    if sp:
        fig, ax = plt.subplots(figsize=(6, 4))
        for fam in sorted({r["family"] for r in sp}):
            pts = [(r["window"], r["test_acc"], binomial_halfwidth(r["test_acc"], r["test_windows"] or 1))
                   for r in sp if r["family"] == fam]
            xs, ys, err = zip(*pts)
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=colors.get(fam), label=FAMILY_LABEL.get(fam, fam))
        ax.axhline(0.25, color="gray", ls="--", lw=1, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("window (bases)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"Great Apes species\n{title}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(out / "dna-species.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def report(runs: Path, out: Path, title: str) -> None:
    rows = collect(load_records(runs), runs)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows)
    tmp = out / ".report.md.tmp"
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, out / "report.md")
    write_json(out / "summary.json", rows)
    for path in plots(rows, out, title):
        print(f"wrote {path}")
    print(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p_run = sub.add_parser("run", help="one domains.dna command with a deadline; its result as JSON")
    p_run.add_argument("--result", type=Path, required=True)
    p_run.add_argument("--deadline", type=float, default=None, help="seconds since the epoch")
    p_run.add_argument("rest", nargs=argparse.REMAINDER, help="-- <command> [overrides]")
    p_rep = sub.add_parser("report", help="tables and plots of the results")
    p_rep.add_argument("--runs", type=Path, required=True)
    p_rep.add_argument("--out", type=Path, required=True)
    p_rep.add_argument("--title", default="")
    args = parser.parse_args(argv)
    if args.what == "run":
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        if not rest:
            parser.error("run: give the command after --, e.g. -- pretrain model=mamba1-dna-cpu")
        return run(rest[0], rest[1:], args.result, args.deadline)
    report(args.runs, args.out, args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
