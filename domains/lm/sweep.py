"""``python -m domains.lm sweep sweep=<name>``: a scaling-law sweep of language models, one training run
of ``domains.lm.train`` a point; ``python -m domains.lm sweep report sweep=<name>``: fits and plots.

A point is ``(point.family, point.size)`` (and whatever else the sweep file sweeps, e.g. ``seq_len``):
the family's template preset (``sweep.families``) scaled to the size by :func:`core.sweep.derive_model`
at the tokenizer's vocabulary, trained for the sweep's token budget, exported, then scored by
``domains.lm.evaluate`` on ``sweep.eval.split`` (all of it). Its record (parameters, FLOPs from
:mod:`core.accounting`, tokens, eval loss in nats per token, bits per byte, the resolved config) joins
``<sweep.dir>/results.csv``; see :mod:`core.sweep` and docs/sweeps.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from core.accounting import count_parameters, training_flops_per_token
from core.checkpoint import read_export_info
from core.presets import get_preset
from core.sweep import (PointContext, apply_batch_rule, configure_steps, data_parallel_size, derive_model,
                        model_overrides, parameters_of, report_command, run_flops, run_point, steps_for,
                        token_budget)


def execute(cfg: DictConfig, context: PointContext) -> dict[str, Any]:
    """Train and evaluate one point (see the module docstring); returns its record's fields."""
    from domains.lm.data import prepare
    from domains.lm.evaluate import evaluate
    from domains.lm.train import train

    data_cfg = dict(OmegaConf.to_container(cfg.data, resolve=True))  # type: ignore[arg-type]
    data_cfg["seq_len"] = int(cfg.seq_len)
    vocab_size = prepare(data_cfg).vocab_size  # cached: train() finds the same preparation
    preset = str(context.spec["preset"])
    template = get_preset(preset, vocab_size=vocab_size)
    count = str(cfg.sweep.count)
    widths = OmegaConf.to_container(cfg.sweep.widths, resolve=True) if cfg.sweep.get("widths") else None
    derived = derive_model(template, str(context.spec["recipe"]), cfg.point.get("size"), count=count,
                           ladder=widths)  # type: ignore[arg-type]
    batch = apply_batch_rule(cfg)
    tokens = token_budget(OmegaConf.to_container(cfg.sweep.tokens, resolve=True),  # type: ignore[arg-type]
                          parameters_of(count_parameters(derived.config), count))
    steps = steps_for(tokens, batch * data_parallel_size(cfg), int(cfg.seq_len))
    with open_dict(cfg):
        cfg.model = {"preset": preset, "overrides": model_overrides(template, derived.config)}
    configure_steps(cfg, steps)
    print(f"{context.tag(str(cfg.sweep.name))}: {preset} scaled to {derived.describe()}; {steps} steps of "
          f"{batch} x {cfg.seq_len} tokens", flush=True)

    metrics = train(cfg)
    run_dir = Path(str(cfg.run.dir))
    trained = read_export_info(run_dir / "export").config  # the model as trained (Hyena's filter length set)
    params = count_parameters(trained)
    flops, trained_tokens = run_flops(lambda length: training_flops_per_token(trained, length, batch), cfg,
                                      int(metrics["steps"]))
    eval_cfg = OmegaConf.create({"checkpoint": str(run_dir), "split": str(cfg.sweep.eval.split), "seq_len": None,
                                 "batch_size": int(cfg.sweep.eval.batch_size), "device": "auto"})
    scores = evaluate(eval_cfg)
    return {
        "recipe": context.spec["recipe"], "template": preset, "target_params": derived.target, "count": count,
        "d_model": trained.d_model, "n_layers": trained.n_layers, "pattern": trained.pattern,
        "seq_len": int(cfg.seq_len), "batch_size": batch, "steps": int(metrics["steps"]),
        "params_total": params.total, "params_non_embedding": params.non_embedding, "params_active": params.active,
        "tokens": trained_tokens, "flops": flops, "flops_per_token": flops / max(trained_tokens, 1),
        "eval_loss": scores["loss"], "loss_unit": "nats/token", "eval_split": str(cfg.sweep.eval.split),
        "eval_tokens": scores["tokens"], "eval_ppl": scores["ppl"], "eval_bits_per_byte": scores["bits_per_byte"],
        "val_loss_during_training": metrics["val_loss"], "unigram_ppl": metrics["unigram_ppl"],
        "vocab_size": trained.vocab_size, "train_seconds": metrics["train_seconds"],
        "tokens_per_s": metrics["tokens_per_s"], "precision": str(cfg.trainer.precision),
    }


def sweep(cfg: DictConfig) -> dict[str, Any]:
    """One point of a sweep (Hydra runs this once per point of the multirun)."""
    return run_point(cfg, "lm", execute, template_content=lambda name: get_preset(name).to_dict())


def sweep_report(cfg: DictConfig) -> dict[str, Any]:
    """The sweep's table, power-law fits and plots."""
    return report_command(cfg, metric_columns=["eval_bits_per_byte"])
