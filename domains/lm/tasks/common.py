"""What every synthetic task shares: the batch format, exact-match scoring, a plain training loop,
and ``run_task`` (train, evaluate per setting, print the table, save results and an export).

A task module (``domains/lm/tasks/<name>.py``) provides

    vocab_size(**params) -> int                       the model's vocabulary for these settings
    generate(batch_size, generator, **params) -> TaskBatch
    describe(**params) -> str                         a short label for a row of the results table

Its training settings, learning rate, steps and evaluation settings come from
``configs/lm/task/<name>.yaml``. Generators are pure functions of a ``torch.Generator``: the batch of
training step ``s`` is drawn from ``seed + s`` and the evaluation batches from a disjoint seed range,
so a run is reproducible and never evaluates on a training sequence by construction of the seeds
(collisions of random sequences aside, which the settings make negligible).

Labels are aligned targets (``labels[:, t]`` is the token position t must predict, -100 elsewhere),
as :class:`core.backbone.CausalLM` takes them; the loss is only on answer positions.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.backbone import IGNORE_INDEX, CausalLM
from core.config import ModelConfig
from core.presets import get_preset
from core.training import OptimConfig, lr_lambda, parameter_groups

EVAL_SEED_OFFSET = 1_000_000_007  # evaluation batches draw from seeds far from the training steps'


@dataclass
class TaskBatch:
    """One batch of a synthetic task.

    input_ids: int64 [B, L] token ids.
    labels:    int64 [B, L]; ``labels[:, t]`` is the answer token expected at position t, -100 where
               nothing is scored.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.labels.shape or self.input_ids.dim() != 2:
            raise ValueError(f"input_ids and labels must both be [B, L], got {tuple(self.input_ids.shape)} "
                             f"and {tuple(self.labels.shape)}")

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(self.input_ids.to(device), self.labels.to(device))

    def __getitem__(self, rows: slice) -> TaskBatch:
        return TaskBatch(self.input_ids[rows], self.labels[rows])

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (tasks draw on the CPU and move batches afterwards)."""
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator


def randint(generator: torch.Generator, low: int, high: int, size: Sequence[int]) -> torch.Tensor:
    """int64 uniform in [low, high) of ``size`` from ``generator``."""
    return torch.randint(low, high, tuple(size), generator=generator)


def random_subsets(generator: torch.Generator, rows: int, population: int, k: int) -> torch.Tensor:
    """int64 [rows, k]: per row, k distinct values of range(population) in random order."""
    if k > population:
        raise ValueError(f"cannot draw {k} distinct values out of {population}")
    return torch.rand(rows, population, generator=generator).argsort(dim=1)[:, :k]


def check_positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------

@dataclass
class Score:
    """Exact-match counts over answer tokens and over whole sequences (every answer token right)."""

    correct_tokens: int = 0
    answer_tokens: int = 0
    correct_sequences: int = 0
    sequences: int = 0

    def add(self, other: Score) -> None:
        self.correct_tokens += other.correct_tokens
        self.answer_tokens += other.answer_tokens
        self.correct_sequences += other.correct_sequences
        self.sequences += other.sequences

    @property
    def accuracy(self) -> float:
        """Fraction of answer tokens predicted exactly (argmax), the number the tables report."""
        return self.correct_tokens / max(1, self.answer_tokens)

    @property
    def sequence_accuracy(self) -> float:
        """Fraction of sequences whose answer tokens are all right."""
        return self.correct_sequences / max(1, self.sequences)


def score_predictions(predictions: torch.Tensor, labels: torch.Tensor) -> Score:
    """Exact match of ``predictions`` [B, L] against the scored positions of ``labels`` [B, L]."""
    scored = labels != IGNORE_INDEX
    right = (predictions == labels) & scored
    per_row = scored.sum(dim=1)
    if bool((per_row == 0).any()):
        raise ValueError("a sequence has no answer position (all labels are -100): nothing to score")
    return Score(correct_tokens=int(right.sum()), answer_tokens=int(scored.sum()),
                 correct_sequences=int((right.sum(dim=1) == per_row).sum()), sequences=labels.shape[0])


@torch.no_grad()
def score_model(model: nn.Module, batch: TaskBatch, batch_size: int | None = None) -> Score:
    """Greedy (argmax) exact match of ``model`` on ``batch``, in chunks of ``batch_size`` rows.

    Teacher forcing is exact here: when every answer token's argmax is right given the true previous
    answer tokens, greedy decoding produces exactly the answer, and conversely.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        total = Score()
        step = batch_size or len(batch)
        for start in range(0, len(batch), step):
            part = batch[start:start + step].to(device)
            logits = model(part.input_ids).logits
            total.add(score_predictions(logits.argmax(dim=-1), part.labels))
    finally:
        model.train(was_training)
    return total


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def load_task(name: str) -> Any:
    """The task module ``domains.lm.tasks.<name>``; a clear error listing the tasks otherwise."""
    from domains.lm.tasks import TASKS

    if name not in TASKS:
        raise KeyError(f"unknown task module {name!r}; tasks: {sorted(TASKS)}")
    return importlib.import_module(f"domains.lm.tasks.{name}")


def task_model_config(preset: str, vocab_size: int, max_seqlen: int,
                      overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """The preset sized to the task's vocabulary; Hyena's filter is defined up to ``max_seqlen``.

    Hyena's implicit filter has a fixed support (``hyena.max_seqlen``), so a model that must read the
    longest evaluation length gets a filter that long (its features are normalized by that length).
    """
    overrides = dict(overrides or {})
    config = get_preset(preset, **overrides)
    config.vocab_size = vocab_size
    config.domain = "lm"
    config.name = preset
    if "H" in config.pattern and config.hyena.max_seqlen < max_seqlen:
        config = get_preset(preset, **{**overrides, "hyena": {**dict(overrides.get("hyena", {})),
                                                              "max_seqlen": int(max_seqlen)}})
        config.vocab_size, config.domain, config.name = vocab_size, "lm", preset
    return config


def task_optimizer(model: CausalLM, optim: OptimConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over core.training's weight-decay groups, and its warmup + cosine schedule. The schedule
    reads ``optim.max_steps`` when it is called, so a caller may still change the step count."""
    optimizer = torch.optim.AdamW(parameter_groups(model, optim), lr=optim.lr, betas=optim.betas, eps=optim.eps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, optim))


def task_step(model: CausalLM, batch: TaskBatch, optimizer: torch.optim.Optimizer, scheduler: Any,
              grad_clip: float) -> float:
    """One training step on ``batch`` (already on the model's device); returns its cross-entropy (a host
    float, so the call waits for the device)."""
    out = model(batch.input_ids, labels=batch.labels)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return float(out.ce_loss.detach())


def train_on_task(model: CausalLM, make_batch: Callable[[int], TaskBatch], steps: int, optim: OptimConfig,
                  grad_clip: float = 1.0, log_every: int = 50, device: torch.device | str = "cpu",
                  log: Callable[[str], None] = print) -> list[float]:
    """AdamW with warmup + cosine (core.training's schedule and weight-decay groups) for ``steps``
    steps; ``make_batch(step)`` gives step's batch. Returns the loss of every step."""
    model.train()
    optimizer, scheduler = task_optimizer(model, optim)
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        losses.append(task_step(model, make_batch(step).to(device), optimizer, scheduler, grad_clip))
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = losses[-log_every:]
            log(f"step {step + 1:5d}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {scheduler.get_last_lr()[0]:.2e}  {time.perf_counter() - started:.0f} s")
    model.eval()
    return losses


def mixture(settings: Sequence[Mapping[str, Any]]) -> Callable[[int], Mapping[str, Any]]:
    """Step -> the training setting of that step: the settings in turn (a deterministic mixture)."""
    if not settings:
        raise ValueError("a task needs at least one training setting")
    return lambda step: settings[step % len(settings)]


def evaluate_settings(model: nn.Module, task: Any, settings: Iterable[Mapping[str, Any]], num_samples: int,
                      seed: int, batch_size: int, max_tokens: int | None = None,
                      log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Accuracy of ``model`` on each evaluation setting: one row per setting.

    ``max_tokens`` caps the evaluation tokens of one setting (at least 8 sequences), so very long
    lengths get fewer samples; the row records how many were scored.
    """
    rows = []
    for index, params in enumerate(settings):
        params = dict(params)
        probe = task.generate(1, seeded(0), **params)
        length = probe.input_ids.shape[1]
        n = num_samples
        if max_tokens:
            n = max(min(8, num_samples), min(num_samples, max_tokens // length))
        rows_per_batch = max(1, min(batch_size, (max_tokens or length * batch_size) // length))
        batch = task.generate(n, seeded(seed + EVAL_SEED_OFFSET + index), **params)
        started = time.perf_counter()
        score = score_model(model, batch, rows_per_batch)
        row = {"setting": task.describe(**params), "params": params, "seq_len": length, "samples": n,
               "accuracy": score.accuracy, "sequence_accuracy": score.sequence_accuracy,
               "answer_tokens": score.answer_tokens, "seconds": time.perf_counter() - started}
        rows.append(row)
        if log:
            log(f"  {row['setting']:<28s} accuracy {row['accuracy']:.3f}  (sequences {row['sequence_accuracy']:.3f}, "
                f"n={n})")
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], title: str) -> str:
    """The results as a Markdown table (what docs/evals.md collects)."""
    lines = [f"{title}", "", "| setting | length | accuracy | sequences exact | samples |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['seq_len']} | {r['accuracy']:.3f} | {r['sequence_accuracy']:.3f} | "
                     f"{r['samples']} |")
    return "\n".join(lines)


@dataclass
class TaskRun:
    """Everything a task run is made of, built from the composed task config: the task module, the
    settings, the model (on ``device``, seeded), the optimizer config (``max_steps`` = ``task.steps``) and
    the batch of each step (``make_batch(step)``: seeded by the run's seed and the step, drawn from the
    training mixture). ``run_task`` trains it for ``optim.max_steps``; scripts that time-box the
    training (scripts/gpu_evals.py) build the same run and stop earlier."""

    task_cfg: dict[str, Any]
    task: Any
    device: torch.device
    seed: int
    train_settings: list[dict[str, Any]]
    eval_settings: list[dict[str, Any]]
    vocab: int
    model_config: ModelConfig
    model: CausalLM
    optim: OptimConfig
    batch_size: int
    make_batch: Callable[[int], TaskBatch]


def prepare_task_run(c: Mapping[str, Any]) -> TaskRun:
    """The :class:`TaskRun` of a composed task config (a plain mapping: ``task``, ``model``, ``run``,
    ``device``, ``threads``, optionally ``compile`` / ``compile_backend``)."""
    from domains.lm.evaluate import pick_device

    task_cfg, model_cfg = dict(c["task"]), c["model"]
    task = load_task(task_cfg["module"])
    device = pick_device(str(c.get("device", "auto")))
    seed = int(c["run"]["seed"])
    if c.get("threads"):
        torch.set_num_threads(int(c["threads"]))
    train_settings = [dict(s) for s in task_cfg["train"]]
    eval_settings = [dict(s) for s in expand_eval(task_cfg["eval"], device)]
    vocab = max(task.vocab_size(**s) for s in train_settings + eval_settings)
    longest = max(task.generate(1, seeded(0), **s).input_ids.shape[1] for s in train_settings + eval_settings)
    model_config = task_model_config(str(model_cfg["preset"]), vocab, longest, model_cfg.get("overrides"))
    torch.manual_seed(seed)
    model = CausalLM(model_config).to(device)
    if c.get("compile"):
        from core.parallel import compile_blocks

        # Training and scoring (cache-free calls) run compiled; the export holds the same state dict.
        compile_blocks(model, backend=str(c.get("compile_backend") or "inductor"))
    optim_fields = dict(task_cfg["optim"])
    optim_fields["betas"] = tuple(optim_fields.get("betas", (0.9, 0.95)))
    optim = OptimConfig(**{**optim_fields, "max_steps": int(task_cfg["steps"])})
    setting_of = mixture(train_settings)
    batch_size = int(task_cfg["batch_size"])

    def make_batch(step: int) -> TaskBatch:
        return task.generate(batch_size, seeded(seed * 1_000_003 + step), **setting_of(step))

    return TaskRun(task_cfg, task, device, seed, train_settings, eval_settings, vocab, model_config, model, optim,
                   batch_size, make_batch)


def run_task(cfg: Any) -> dict[str, Any]:
    """``python -m domains.lm task task=<name> model=<preset>``: train, evaluate, report.

    ``cfg`` is the composed ``configs/lm/task.yaml`` (a DictConfig or a plain mapping with the same
    keys). Writes ``results.json`` and an export (``export/``) under ``run.dir``; returns the results.
    """
    from omegaconf import OmegaConf

    if not isinstance(cfg, Mapping):
        raise TypeError(f"run_task needs the composed task config, got {type(cfg).__name__}")
    c = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True) if not isinstance(cfg, dict) else cfg
    run = prepare_task_run(c)
    task_cfg, model, model_config, steps = run.task_cfg, run.model, run.model_config, run.optim.max_steps
    n_params = model.num_parameters()
    print(f"task {task_cfg['name']}: vocab {run.vocab}; model {model_config.name} pattern {model_config.pattern!r}, "
          f"{n_params:,} parameters; device {run.device}")
    started = time.perf_counter()
    losses = train_on_task(model, run.make_batch, steps, run.optim, grad_clip=float(task_cfg.get("grad_clip", 1.0)),
                           log_every=int(c.get("log_every", 50)), device=run.device)
    train_seconds = time.perf_counter() - started
    print(f"trained {steps} steps in {train_seconds:.0f} s; evaluating")
    ev = task_cfg["eval_options"]
    rows = evaluate_settings(model, run.task, run.eval_settings, int(ev["samples"]), run.seed, int(ev["batch_size"]),
                             ev.get("max_tokens"))
    title = f"{task_cfg['name']} / {model_config.name} ({steps} steps, batch {run.batch_size}, seed {run.seed})"
    print("\n" + format_table(rows, title))
    results = {"task": task_cfg["name"], "model": model_config.name, "pattern": model_config.pattern,
               "parameters": n_params, "steps": steps, "batch_size": run.batch_size, "seed": run.seed,
               "train_seconds": train_seconds, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
               "train": run.train_settings, "rows": rows}
    run_dir = c["run"].get("dir")
    if run_dir:
        from core.checkpoint import atomic_write, save_export

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(results, indent=2) + "\n"
        atomic_write(run_dir / "results.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
        if c["run"].get("export", True):
            save_export(model, run_dir / "export", extra={"task": task_cfg, "results": rows})
        print(f"results: {run_dir / 'results.json'}")
    return results


def expand_eval(eval_cfg: Any, device: torch.device) -> list[dict[str, Any]]:
    """The evaluation settings: a list of parameter dicts, or ``{"base": {...}, "seq_len_log2":
    {"from": a, "to_cpu": b, "to_gpu": c}}`` (one setting per power of two, the top depending on the
    device)."""
    if isinstance(eval_cfg, Mapping):
        base = dict(eval_cfg.get("base", {}))
        span = eval_cfg["seq_len_log2"]
        top = span["to_gpu"] if device.type == "cuda" else span["to_cpu"]
        return [{**base, "seq_len": 2 ** k} for k in range(int(span["from"]), int(top) + 1)]
    return [dict(s) for s in eval_cfg]


__all__ = ["EVAL_SEED_OFFSET", "Score", "TaskBatch", "evaluate_settings", "expand_eval", "format_table",
           "load_task", "mixture", "random_subsets", "run_task", "score_model", "score_predictions", "seeded",
           "task_model_config", "train_on_task"]
