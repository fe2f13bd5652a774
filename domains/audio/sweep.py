"""``python -m domains.audio sweep sweep=<name>``: scaling sweeps of sample-level audio models (the
context length at a fixed size, as the Mamba paper's YouTubeMix / SC09 ablations, or the model size),
one ``domains.audio.train`` run a point; ``python -m domains.audio sweep report sweep=<name>``.

A family is a model spec of ``configs/audio/model/`` (``sweep.families: {mamba: sashimi-mamba, ...}``).
``point.size`` (null: the spec as it is) scales the spec's width ``d_model`` (a multiple of 4; the
levels of a multi-scale model follow it) to the parameter count nearest the target; the pattern and the
pooling stay. After training the model scores the first ``sweep.eval.clips`` clips of
``sweep.eval.split``, each whole, in consecutive windows of the training context scored from an empty
state (:func:`score_clips`): the same samples at every context length. ``eval_loss`` is that NLL in
nats per sample (the table also gives bits per sample).

FLOPs: a multi-scale level ``l`` runs on ``L / P_l`` positions (``P_l`` the product of the pools before
it), so per input sample it costs ``1 / P_l`` of its blocks' cost at that length, plus the pooling
projections and the output head; all from :mod:`core.accounting` (3x forward for training).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from core.accounting import flops_breakdown, training_flops_per_token
from core.cli import CONFIG_ROOT
from core.config import ModelConfig
from core.multiscale import MultiScaleConfig
from domains.audio.data import Quantization
from core.sweep import (PointContext, apply_batch_rule, configure_steps, data_parallel_size, format_count,
                        model_overrides, parse_count, report_command, run_flops, run_point, steps_for,
                        token_budget, with_width)

WIDTH_STEP = 4  # d_model candidates: multiples of 4 (mamba's dt_rank, MLP rounding and pooling all accept them)


def load_spec(name: str) -> dict[str, Any]:
    """The model spec ``configs/audio/model/<name>.yaml`` as a dict."""
    path = CONFIG_ROOT / "audio" / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"sweep family model {name!r}: no {path}; model specs: {known}")
    return dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))  # type: ignore[arg-type]


def parameter_counts(spec: dict[str, Any], vocab_size: int) -> dict[str, int]:
    """total / non_embedding / active parameters of the model a spec builds (built on the meta device:
    shapes only, no memory, no init)."""
    import torch

    from domains.audio.model import build_model

    with torch.device("meta"):
        model = build_model(spec, vocab_size)
    seen, total, embedding = set(), 0, 0
    for name, param in model.named_parameters():  # tied weights appear once
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if name.endswith("embedding.weight") or name.startswith("lm_head."):
            embedding += param.numel()
    return {"total": total, "non_embedding": total - embedding, "active": total}


def with_spec_width(spec: dict[str, Any], d_model: int, vocab_size: int) -> dict[str, Any]:
    """``spec`` at width ``d_model``: :func:`core.sweep.with_width` on its block recipe (head widths, MLP
    ratios kept), written back as the spec's ``config`` fields."""
    base = {**dict(spec["config"]), "vocab_size": vocab_size, "pad_vocab_size_multiple": 1, "domain": "audio"}
    template = ModelConfig.from_dict(base)
    changes = model_overrides(template, with_width(template, d_model))
    out = copy.deepcopy(spec)
    for key, value in changes.items():
        if isinstance(value, dict):
            out["config"][key] = {**dict(out["config"].get(key) or {}), **value}
        else:
            out["config"][key] = value
    return out


def scale_spec(spec: dict[str, Any], size: Any, count: str, vocab_size: int) -> tuple[dict[str, Any], float | None]:
    """(spec at the width whose ``count`` parameters are nearest ``size``, the target); size None: as is."""
    if size is None or str(size).strip().lower() in ("", "null", "none", "preset"):
        return spec, None
    target = parse_count(size, "point.size")

    def params(d: int) -> int:
        return parameter_counts(with_spec_width(spec, d, vocab_size), vocab_size)[count]

    # Counts grow with the width: bisect on multiples of WIDTH_STEP, then take the nearer neighbour.
    lo, hi = 1, 512
    while lo < hi:
        mid = (lo + hi) // 2
        if params(mid * WIDTH_STEP) < target:
            lo = mid + 1
        else:
            hi = mid
    candidates = [d for d in ((lo - 1) * WIDTH_STEP, lo * WIDTH_STEP) if d >= WIDTH_STEP]
    best = min(candidates, key=lambda d: abs(math.log(params(d) / target)))
    return with_spec_width(spec, best, vocab_size), target


def flops_per_sample(spec: dict[str, Any], vocab_size: int, seq_len: int, batch_size: int) -> float:
    """Training FLOPs per input sample at context ``seq_len`` (module docstring)."""
    from domains.audio.model import model_config

    config = model_config(spec, vocab_size)
    if isinstance(config, ModelConfig):
        return float(training_flops_per_token(config, seq_len, batch_size))
    assert isinstance(config, MultiScaleConfig)
    widths = config.widths()
    forward = flops_breakdown(config.level_config(0), seq_len, batch_size).lm_head
    for level in range(len(config.pools) + 1):
        pool = math.prod(config.pools[:level])
        breakdown = flops_breakdown(config.level_config(level), max(1, seq_len // pool), batch_size)
        forward += sum(sum(layer.values()) for layer in breakdown.per_layer) / pool
    for i, p in enumerate(config.pools):
        coarse = math.prod(config.pools[: i + 1])
        forward += 2 * (2 * widths[i] * p * widths[i + 1]) / coarse  # the down and the up projection
    return 3.0 * forward


def score_clips(run_dir: Path, cfg: DictConfig, split: str, seq_len: int) -> tuple[float, int, int]:
    """(bits per sample, samples scored, clips) of the export in ``run_dir`` over the first
    ``sweep.eval.clips`` clips of ``split`` (null: all), each clip whole, cut into consecutive windows of
    ``seq_len`` samples scored from an empty state (``domains.audio.evaluate``'s windows and NLL).

    Every context length thus scores the same samples: scoring one window a clip instead would score
    mostly the silence before a digit at short contexts and the digit at long ones."""
    from domains.audio.data import Windows, prepare
    from domains.audio.evaluate import nll_bits
    from domains.audio.model import load_audio_export, pick_device

    device = pick_device("auto")
    model, meta = load_audio_export(run_dir, device)
    data = prepare(OmegaConf.to_container(cfg.data, resolve=True))  # type: ignore[arg-type]
    data.manifest["scale"] = meta["audio"]["scale"]  # the model's normalization
    quant = Quantization(str(meta["audio"]["scheme"]), int(meta["audio"]["bits"]))
    windows = Windows(data, split, seq_len, quant)
    limit = cfg.sweep.eval.get("clips")
    clips = len(data.entries(split)) if limit is None else min(int(limit), len(data.entries(split)))
    windows.index = [(clip, start) for clip, start in windows.index if clip < clips]
    bits, scored = nll_bits(model, windows, int(cfg.sweep.eval.batch_size), device)
    return bits, scored, clips


def execute(cfg: DictConfig, context: PointContext) -> dict[str, Any]:
    """Train and evaluate one point; returns its record's fields."""
    from domains.audio.train import quantization_from, train

    quant = quantization_from(cfg)
    name = str(context.spec["model"])
    count = str(cfg.sweep.count)
    spec, target = scale_spec(load_spec(name), cfg.point.get("size"), count, quant.vocab_size)
    counts = parameter_counts(spec, quant.vocab_size)
    seq_len = int(cfg.seq_len)
    batch = apply_batch_rule(cfg)
    budget = OmegaConf.to_container(cfg.sweep.tokens, resolve=True)
    tokens = token_budget(budget, counts[count])  # type: ignore[arg-type]
    steps = steps_for(tokens, batch * data_parallel_size(cfg), seq_len)
    with open_dict(cfg):
        cfg.model = spec
    configure_steps(cfg, steps)
    aim = "" if target is None else f" (target {format_count(target)})"
    print(f"{context.tag(str(cfg.sweep.name))}: {name} at d_model {spec['config']['d_model']}, "
          f"{counts[count]:,} {count.replace('_', '-')} parameters{aim}; {steps} steps of {batch} x {seq_len} "
          "samples", flush=True)

    metrics = train(cfg)
    if int(metrics["parameters"]) != counts["total"]:
        raise AssertionError(f"counted {counts['total']:,} parameters, the trained model had {metrics['parameters']:,}")
    flops, trained_tokens = run_flops(lambda length: flops_per_sample(spec, quant.vocab_size, length, batch), cfg,
                                      int(metrics["steps"]))
    split = str(cfg.sweep.eval.split)
    bits, scored, clips = score_clips(Path(str(cfg.run.dir)), cfg, split, seq_len)
    return {
        "recipe": spec.get("backbone"), "template": name, "target_params": target, "count": count,
        "d_model": int(spec["config"]["d_model"]), "n_layers": len(spec["config"]["pattern"]),
        "pattern": spec["config"]["pattern"], "pools": spec.get("pools"),
        "seq_len": seq_len, "batch_size": batch, "steps": int(metrics["steps"]),
        "params_total": counts["total"], "params_non_embedding": counts["non_embedding"],
        "params_active": counts["active"], "tokens": trained_tokens, "flops": flops,
        "flops_per_token": flops / max(trained_tokens, 1),
        "eval_loss": bits * math.log(2), "loss_unit": "nats/sample", "eval_split": split,
        "eval_tokens": scored, "eval_clips": clips, "eval_bits_per_sample": bits,
        "val_bits_per_sample_during_training": metrics["val_bits_per_sample"],
        "train_seconds": metrics["train_seconds"], "precision": str(cfg.trainer.precision),
    }


def sweep(cfg: DictConfig) -> dict[str, Any]:
    """One point of a sweep (Hydra runs this once per point of the multirun)."""
    return run_point(cfg, "audio", execute, template_key="model", template_content=load_spec)


def sweep_report(cfg: DictConfig) -> dict[str, Any]:
    """The sweep's table, power-law fits and plots."""
    return report_command(cfg, metric_columns=["eval_bits_per_sample"])
