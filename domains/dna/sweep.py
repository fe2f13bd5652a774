"""``python -m domains.dna sweep sweep=<name>``: scaling sweeps of DNA models (model size at a fixed
context, or the context length at a fixed size, as the Mamba paper's DNA section), one
``domains.dna.pretrain`` run a point; ``python -m domains.dna sweep report sweep=<name>``: fits and plots.

A point is ``(point.family, point.size[, seq_len])``: the family's template (``sweep.families``, a name of
:mod:`core.dna_presets` or :mod:`core.presets`) scaled by :func:`core.sweep.derive_model` at the DNA
vocabulary (``point.size: null`` keeps the template's size), pretrained for the sweep's token budget
(``sweep.tokens_per_batch`` fixes the tokens a step, so longer contexts take fewer windows a batch).
``pretrain`` ends with its own evaluation: the mean loss over fixed validation and test windows; the
sweep sets their number from ``sweep.eval.tokens`` so that every context length scores about the same
number of bases. The record's ``eval_loss`` is the validation loss in nats per token.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from core.accounting import count_parameters, training_flops_per_token
from core.checkpoint import read_export_info
from core.dna_presets import get_dna_preset
from core.sweep import (PointContext, apply_batch_rule, configure_steps, data_parallel_size, derive_model,
                        model_overrides, parameters_of, report_command, run_flops, run_point, steps_for,
                        token_budget)


def execute(cfg: DictConfig, context: PointContext) -> dict[str, Any]:
    """Pretrain and evaluate one point; returns its record's fields."""
    from domains.dna.pretrain import pretrain
    from domains.dna.tokenizer import DNATokenizer

    tokenizer = DNATokenizer(int(cfg.tokenizer.k))
    preset = str(context.spec["preset"])
    template = get_dna_preset(preset, vocab_size=tokenizer.vocab_size)
    count = str(cfg.sweep.count)
    widths = OmegaConf.to_container(cfg.sweep.widths, resolve=True) if cfg.sweep.get("widths") else None
    derived = derive_model(template, str(context.spec["recipe"]), cfg.point.get("size"), count=count,
                           ladder=widths)  # type: ignore[arg-type]
    seq_len = int(cfg.seq_len)
    batch = apply_batch_rule(cfg)
    tokens = token_budget(OmegaConf.to_container(cfg.sweep.tokens, resolve=True),  # type: ignore[arg-type]
                          parameters_of(count_parameters(derived.config), count))
    steps = steps_for(tokens, batch * data_parallel_size(cfg), seq_len)
    with open_dict(cfg):
        cfg.model = {"preset": preset, "overrides": model_overrides(template, derived.config)}
        eval_tokens = cfg.sweep.eval.get("tokens")
        if eval_tokens is not None:
            cfg.eval_windows = max(int(cfg.sweep.eval.get("min_windows", 4)), math.ceil(int(eval_tokens) / seq_len))
    configure_steps(cfg, steps)
    print(f"{context.tag(str(cfg.sweep.name))}: {preset} scaled to {derived.describe()}; {steps} steps of "
          f"{batch} x {seq_len} tokens ({seq_len * tokenizer.k:,} bases a window)", flush=True)

    metrics = pretrain(cfg)
    trained = read_export_info(Path(str(cfg.run.dir)) / "export").config  # Hyena's filter length as trained
    params = count_parameters(trained)
    if params.total != int(metrics["parameters"]):
        raise AssertionError(f"accounting counts {params.total:,} parameters, the trained model had "
                             f"{int(metrics['parameters']):,}")
    flops, trained_tokens = run_flops(lambda length: training_flops_per_token(trained, length, batch), cfg,
                                      int(metrics["steps"]))
    return {
        "recipe": context.spec["recipe"], "template": preset, "target_params": derived.target, "count": count,
        "d_model": trained.d_model, "n_layers": trained.n_layers, "pattern": trained.pattern,
        "seq_len": seq_len, "bases_per_window": seq_len * tokenizer.k, "batch_size": batch,
        "steps": int(metrics["steps"]),
        "params_total": params.total, "params_non_embedding": params.non_embedding, "params_active": params.active,
        "tokens": trained_tokens, "flops": flops, "flops_per_token": flops / max(trained_tokens, 1),
        "eval_loss": metrics["val_loss"], "loss_unit": "nats/token", "eval_split": "val",
        "eval_tokens": metrics["val_tokens"], "eval_bits_per_base": metrics["val_bits_per_base"],
        "test_loss": metrics["test_loss"], "test_bits_per_base": metrics["test_bits_per_base"],
        "test_unigram_bits_per_base": metrics["test_unigram_bits_per_base"],
        "train_seconds": metrics["train_seconds"], "precision": str(cfg.trainer.precision),
    }


def sweep(cfg: DictConfig) -> dict[str, Any]:
    """One point of a sweep (Hydra runs this once per point of the multirun)."""
    return run_point(cfg, "dna", execute, template_content=lambda name: get_dna_preset(name).to_dict())


def sweep_report(cfg: DictConfig) -> dict[str, Any]:
    """The sweep's table, power-law fits and plots."""
    return report_command(cfg, metric_columns=["eval_bits_per_base", "test_bits_per_base"])
