"""Scaling-law sweeps, domain-agnostic: model sizes from a parameter target, token budgets, the results
table every finished point appends to, the power-law fit ``loss(C) = a * C^-b + c`` and its plots.

A sweep is a Hydra config (``configs/<domain>/sweep/<name>.yaml``) run as a multirun over its
*points*: ``python -m domains.<domain> sweep sweep=<name>``. Each point is one training run of the
domain's own training function; the domains (``domains/<d>/sweep.py``) turn a point's config into that
run and return its metrics. This module holds everything that does not depend on the domain:

Sizes (:func:`derive_model`)
    A *family* is a recipe (how the block pattern grows with depth: ``S`` per layer for Mamba-1, ``M``
    for Mamba-2, ``*-`` for Transformer++, ``H-`` for Hyena, Megatron's allocation for the
    Mamba-2-Hybrid) applied to a *template* preset that fixes everything else (state size, head width,
    MLP ratio, ...). A size is a parameter target; the width comes from the width ladder
    (:data:`LADDER`, the GPT-3 / Mamba-paper grid of Transformer++ shapes extended down to CPU sizes):
    the rung whose reference Transformer++ count (``12 d^2`` per layer, the convention of the Mamba
    paper) is nearest the target. The depth is then solved per family so that its parameter count (from
    :mod:`core.accounting`) is nearest the target at that width. Every family at a target therefore has
    the same width, and a Mamba stack ends up with about twice the layers of the Transformer++ (a Mamba
    block has ~``3 * expand * d^2`` = 6 d^2 parameters, a Transformer++ layer ~12 d^2).
    A size may also be a Mamba-paper grid label (``125m``, ``350m``, ``760m``, ``1.3b``): families with
    a preset on that rung (``mamba1-130m``, ``transformer++-350m``, ...) take the preset's width and
    depth exactly; the others are matched to that rung's Transformer++ count.

Tokens (:func:`token_budget`)
    ``{rule: fixed, value: 2M}`` (every point sees the same tokens) or
    ``{rule: chinchilla, per_param: 20}`` (Hoffmann et al.: 20 tokens per parameter of the counted kind).

Results (:class:`ResultsTable`)
    Each finished point writes one record ``<sweep dir>/results/<key>.json`` (temporary name, then
    rename: a crash leaves no partial record), then the table ``<sweep dir>/results.csv`` is rebuilt from
    all records (under a file lock, written whole under a temporary name and renamed). ``key`` is a hash
    of the point's resolved config without bookkeeping (output folders, logging, worker counts), so a
    re-run skips finished points, and a point whose settings changed is a new point.

Report (:func:`fit_power_law`, :func:`report`)
    Per family (and per differing setting, if the table mixes runs of different settings) a least-squares
    fit of ``loss = a * x^-b + c`` with standard errors from the Jacobian, a markdown table, and log-log
    plots of loss against FLOPs and parameters (and the context length, where it was swept).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.accounting import ParameterCount, attention_dims, count_parameters
from core.checkpoint import atomic_write
from core.config import ModelConfig
from core.pattern import allocate_layers

# --------------------------------------------------------------------------------------------------
# Counts and sizes
# --------------------------------------------------------------------------------------------------

_SUFFIXES = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_COUNT_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*$", re.IGNORECASE)


def parse_count(value: Any, what: str = "count") -> float:
    """A number from ``value``: an int / float, or a string such as ``"125M"``, ``"2.5e6"``, ``"30K"``
    (suffixes K, M, B or G, T; case-insensitive)."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a number such as 30K, 1.5M or 2e9, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        match = _COUNT_RE.match(str(value))
        if match is None:
            raise ValueError(f"{what}: cannot read {value!r} as a number; write e.g. 30K, 1.5M, 2e9 or 125000")
        number = float(match.group(1)) * _SUFFIXES[match.group(2).lower()]
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{what}: must be a positive number, got {value!r}")
    return number


def format_count(value: float) -> str:
    """``1234567`` -> ``'1.23M'`` (for labels and tables)."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


# The width ladder: (d_model, Transformer++ layers). From 768 up it is the GPT-3 grid the Mamba paper
# trains (its Transformer++ presets: 12 x 768, 24 x 1024, 24 x 1536, 24 x 2048, 32 x 2560); below, a
# geometric extension (about 2-3x in parameters a rung) down to the sizes that train on a CPU.
LADDER: tuple[tuple[int, int], ...] = (
    (32, 2), (48, 2), (64, 2), (96, 3), (128, 4), (192, 4), (256, 6), (384, 6), (512, 8), (640, 10),
    (768, 12), (1024, 24), (1536, 24), (2048, 24), (2560, 32),
)

# The Mamba paper's grid (its Table 12): the label of each rung and, per family, the preset at that rung.
# (hybrid-130m is our own scaling, with ~30% more non-embedding parameters than the rung's Transformer++:
# a hybrid is matched by count like every family without a paper preset.)
PAPER_GRID: dict[str, dict[str, str]] = {
    "125m": {"transformer++": "transformer++-125m", "mamba1": "mamba1-130m", "mamba2": "mamba2-130m"},
    "350m": {"transformer++": "transformer++-350m", "mamba1": "mamba1-370m", "mamba2": "mamba2-370m"},
    "760m": {"transformer++": "transformer++-760m", "mamba1": "mamba1-790m", "mamba2": "mamba2-780m"},
    "1.3b": {"transformer++": "transformer++-1.3b", "mamba1": "mamba1-1.4b", "mamba2": "mamba2-1.3b"},
}

COUNTS = ("non_embedding", "total", "active")


def parameters_of(counts: ParameterCount, count: str) -> int:
    """The ``count`` kind (``non_embedding``, ``total`` or ``active``) of a :class:`ParameterCount`."""
    if count not in COUNTS:
        raise ValueError(f"sweep.count must be one of {list(COUNTS)}, got {count!r}")
    return int(getattr(counts, count))


# --------------------------------------------------------------------------------------------------
# Recipes: how a family's pattern grows with depth
# --------------------------------------------------------------------------------------------------

HYBRID_ATTENTION_RATIO = 0.08  # NVIDIA's Mamba-2-Hybrid (core.presets' hybrid-8b)
HYBRID_MLP_RATIO = 0.5


def _hybrid_pattern(blocks: int) -> str:
    # Megatron's allocation at the 8B's ratios, but never without an attention block: below 7 blocks
    # round(0.08 n) is 0, and a "hybrid" with no attention would be a Mamba-2/MLP stack.
    ratio = max(HYBRID_ATTENTION_RATIO, 1.0 / blocks)
    return allocate_layers(blocks, ratio, HYBRID_MLP_RATIO)


@dataclass(frozen=True)
class Recipe:
    """A family's pattern as a function of its depth (``units``), and the smallest sensible depth."""

    name: str
    describe: str
    pattern: Callable[[int], str]
    min_units: int = 1


RECIPES: dict[str, Recipe] = {
    "mamba1": Recipe("mamba1", "'S' per layer", lambda n: "S" * n),
    "mamba2": Recipe("mamba2", "'M' per layer", lambda n: "M" * n),
    "transformer++": Recipe("transformer++", "'*-' per layer (attention + MLP)", lambda n: "*-" * n),
    "hyena": Recipe("hyena", "'H-' per layer (Hyena + MLP)", lambda n: "H-" * n),
    "hybrid": Recipe("hybrid", "Megatron's allocation of n blocks at 8% attention, 50% MLP (at least one "
                     "attention block)", _hybrid_pattern, min_units=4),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        known = "\n".join(f"  {r.name}: {r.describe}" for r in RECIPES.values())
        raise ValueError(f"unknown sweep recipe {name!r}; a family's recipe is one of:\n{known}\n"
                         "(set it with sweep.families.<family>.recipe when the family's name is not one)")
    return RECIPES[name]


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(k for k in range(1, max(1, min(n, limit)) + 1) if n % k == 0)


def with_width(template: ModelConfig, d_model: int) -> ModelConfig:
    """``template`` at width ``d_model``, keeping what the recipe fixes in absolute terms.

    Attention keeps its head width (more heads at a larger width) and its GQA group size; an MLP / MoE
    whose hidden width the template sets explicitly keeps its ratio to ``d_model`` (an unset one follows
    the width by its own rule); Mamba-2 keeps its head width and its number of B/C groups where they
    still divide the heads. A width the head width does not divide is an error naming both.
    """
    if d_model < 1:
        raise ValueError(f"d_model must be positive, got {d_model}")
    if d_model == template.d_model:
        return dataclasses.replace(template)
    changes: dict[str, Any] = {"d_model": d_model}
    ratio = d_model / template.d_model
    name = template.name or "the template"
    if "*" in template.pattern:
        n_heads, n_kv, head_dim = attention_dims(template)
        if d_model % head_dim:
            raise ValueError(f"{name}: width {d_model} is not a multiple of its attention head width {head_dim}; "
                             "choose sweep.widths whose d_model the head width divides")
        heads = d_model // head_dim
        kv = _largest_divisor_at_most(heads, max(1, heads // max(1, n_heads // n_kv)))
        changes["attention"] = dataclasses.replace(
            template.attention, n_heads=heads, n_kv_heads=None if template.attention.n_kv_heads is None else kv)
    for sub, chars in (("mlp", "-"), ("moe", "E")):
        sub_config = getattr(template, sub)
        if any(c in template.pattern for c in chars) and sub_config.hidden_size is not None:
            changes[sub] = dataclasses.replace(sub_config, hidden_size=max(1, round(sub_config.hidden_size * ratio)))
    if "M" in template.pattern:
        c = template.mamba2
        d_inner = c.expand * d_model
        if d_inner % c.headdim:
            raise ValueError(f"{name}: Mamba-2's inner width {c.expand} x {d_model} = {d_inner} is not a multiple of "
                             f"its head width {c.headdim}; choose another width")
        nheads = d_inner // c.headdim
        changes["mamba2"] = dataclasses.replace(c, ngroups=math.gcd(c.ngroups, nheads))
    return dataclasses.replace(template, **changes)


def model_overrides(template: ModelConfig, config: ModelConfig) -> dict[str, Any]:
    """The fields of ``config`` that differ from ``template``, as ``core.presets.get_preset`` overrides
    (sub-configs as dicts of their changed fields): what a domain's ``model.overrides`` takes."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(ModelConfig):
        new, old = getattr(config, f.name), getattr(template, f.name)
        if new == old:
            continue
        if dataclasses.is_dataclass(new):
            out[f.name] = {g.name: getattr(new, g.name) for g in dataclasses.fields(new)
                           if getattr(new, g.name) != getattr(old, g.name)}
        else:
            out[f.name] = new
    return out


@dataclass
class DerivedSize:
    """What :func:`derive_model` chose, for the results table and the log."""

    config: ModelConfig
    target: float | None  # parameters aimed at (None: the template as is)
    count: str
    params: int  # the chosen model's count of that kind
    units: int | None  # the recipe's depth
    rule: str  # "template", "preset <name>" or "matched at width d"

    def describe(self) -> str:
        aim = "" if self.target is None else f" (target {format_count(self.target)}, {self.count})"
        if self.target is not None and abs(math.log(self.params / self.target)) > math.log(1.25):
            aim += f" [off target by x{self.params / self.target:.2f}: the nearest depth at this width]"
        return (f"d_model {self.config.d_model}, {self.config.n_layers} blocks {self.config.pattern!r}, "
                f"{self.params:,} {self.count.replace('_', '-')} parameters{aim}; {self.rule}")


def reference_parameters(d_model: int, layers: int, count: str, vocab_size: int = 0) -> float:
    """The ladder's reference Transformer++ count at a rung: 12 d^2 per layer (4 d^2 attention + 8 d^2
    SwiGLU), plus the tied embedding when counting ``total``."""
    blocks = 12.0 * d_model * d_model * layers
    return blocks + (vocab_size * d_model if count == "total" else 0.0)


def ladder_width(target: float, count: str, vocab_size: int, ladder: Sequence[Sequence[int]] = LADDER) -> int:
    """The width of the rung whose reference count is nearest ``target`` (in ratio)."""
    if not ladder:
        raise ValueError("sweep.widths is empty: give [d_model, layers] rungs or null for the default ladder")
    rungs = [(int(d), int(n)) for d, n in ladder]
    best = min(rungs, key=lambda r: abs(math.log(reference_parameters(r[0], r[1], count, vocab_size) / target)))
    return best[0]


def solve_depth(template: ModelConfig, recipe: Recipe, target: float, count: str,
                max_units: int = 512) -> tuple[ModelConfig, int, int]:
    """The depth (in recipe units) whose count is nearest ``target`` at the template's width:
    (config, units, count). Counts grow with depth, so the search stops once they pass the target."""
    best: tuple[float, ModelConfig, int, int] | None = None
    for units in range(recipe.min_units, max_units + 1):
        config = dataclasses.replace(template, pattern=recipe.pattern(units))
        params = parameters_of(count_parameters(config), count)
        error = abs(math.log(params / target))
        if best is None or error < best[0]:
            best = (error, config, units, params)
        if params > target:
            break
    assert best is not None
    return best[1], best[2], best[3]


def derive_model(template: ModelConfig, recipe: str | Recipe, size: Any, *, count: str = "non_embedding",
                 ladder: Sequence[Sequence[int]] | None = None) -> DerivedSize:
    """A model of family ``recipe`` built on ``template`` at ``size`` (see the module docstring).

    ``size``: None (the template as it is), a Mamba-paper grid label (``125m``, ``350m``, ``760m``,
    ``1.3b``) or a parameter target (number or ``"30K"``-style string) of the ``count`` kind, at the
    template's vocabulary.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if count not in COUNTS:
        raise ValueError(f"sweep.count must be one of {list(COUNTS)}, got {count!r}")
    if size is None or (isinstance(size, str) and size.strip().lower() in ("", "null", "none", "preset")):
        config = dataclasses.replace(template)
        return DerivedSize(config, None, count, parameters_of(count_parameters(config), count), None, "template")
    ladder = LADDER if ladder is None else ladder
    label = str(size).strip().lower()
    if label in PAPER_GRID:
        from core.presets import get_preset

        grid = PAPER_GRID[label]
        if recipe.name in grid:
            shape = get_preset(grid[recipe.name])
            config = dataclasses.replace(with_width(template, shape.d_model), pattern=shape.pattern)
            params = parameters_of(count_parameters(config), count)
            reference = get_preset(grid["transformer++"], vocab_size=template.vocab_size)
            target = float(parameters_of(count_parameters(reference), count))
            return DerivedSize(config, target, count, params, None, f"the shape of preset {grid[recipe.name]}")
        reference = get_preset(grid["transformer++"], vocab_size=template.vocab_size)
        target = float(parameters_of(count_parameters(reference), count))
        width = reference.d_model
    else:
        target = parse_count(size, "point.size")
        width = ladder_width(target, count, template.padded_vocab_size, ladder)
    config, units, params = solve_depth(with_width(template, width), recipe, target, count)
    return DerivedSize(config, target, count, params, units, f"depth matched at width {width}")


# --------------------------------------------------------------------------------------------------
# Token budgets and FLOPs
# --------------------------------------------------------------------------------------------------

def token_budget(spec: Mapping[str, Any], params: int | None = None) -> int:
    """Training tokens of a point: ``{rule: fixed, value: N}`` or ``{rule: chinchilla, per_param: 20}``
    (``params``: the model's parameters of the sweep's count kind)."""
    rule = spec.get("rule")
    if rule == "fixed":
        return int(round(parse_count(spec.get("value"), "sweep.tokens.value")))
    if rule == "chinchilla":
        if params is None:
            raise ValueError("sweep.tokens.rule=chinchilla needs the model's parameter count")
        per_param = float(spec.get("per_param", 20))
        if per_param <= 0:
            raise ValueError(f"sweep.tokens.per_param must be positive, got {per_param}")
        return int(round(per_param * params))
    raise ValueError(f"sweep.tokens.rule must be 'fixed' (with value) or 'chinchilla' (with per_param), got {rule!r}")


def steps_for(tokens: int, batch_size: int, seq_len: int) -> int:
    """Optimizer steps that cover ``tokens`` at ``batch_size`` windows of ``seq_len`` (at least 1)."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    return max(1, math.ceil(tokens / (batch_size * seq_len)))


def training_flops(flops_per_token: Callable[[int], float], seq_len: int, batch_size: int, steps: int,
                   length_at: Callable[[int], int] | None = None) -> tuple[float, int]:
    """(training FLOPs, tokens) of ``steps`` steps of ``batch_size`` windows; ``length_at(step)`` gives the
    window length under sequence-length warmup (default: ``seq_len`` throughout)."""
    if length_at is None:
        tokens = steps * batch_size * seq_len
        return flops_per_token(seq_len) * tokens, tokens
    flops, tokens, cache = 0.0, 0, {}
    for step in range(steps):
        length = length_at(step)
        if length not in cache:
            cache[length] = flops_per_token(length)
        flops += cache[length] * batch_size * length
        tokens += batch_size * length
    return flops, tokens


def data_parallel_size(cfg: Any) -> int:
    """Processes that each train on ``batch_size`` windows a step (``trainer.devices`` x ``num_nodes``
    when they are numbers, as the domains' samplers count them)."""
    devices = cfg.trainer.get("devices", 1)
    nodes = cfg.trainer.get("num_nodes", 1)
    return (devices if isinstance(devices, int) else 1) * (nodes if isinstance(nodes, int) else 1)


def apply_batch_rule(cfg: Any) -> int:
    """``batch_size`` (per process) of a point: ``sweep.tokens_per_batch // (seq_len x processes)`` when
    the sweep fixes the tokens a step (context sweeps: longer windows, fewer of them, as the Mamba
    paper's), else the config's."""
    from omegaconf import open_dict

    per_batch = cfg.sweep.get("tokens_per_batch")
    if per_batch is None:
        return int(cfg.batch_size)
    per_batch, seq_len = int(parse_count(per_batch, "sweep.tokens_per_batch")), int(cfg.seq_len)
    world = data_parallel_size(cfg)
    if per_batch < seq_len * world:
        raise ValueError(f"sweep.tokens_per_batch={per_batch} is less than one window of seq_len={seq_len} per "
                         f"process ({world}): raise it to at least the longest context of the sweep x processes")
    with open_dict(cfg):
        cfg.batch_size = per_batch // (seq_len * world)
    return int(cfg.batch_size)


def configure_steps(cfg: Any, steps: int) -> None:
    """Set a point's run length to ``steps``: validation (and its checkpoint) at most every ``steps``, and
    the warmup a fraction of the run when ``sweep.warmup_fraction`` is set (a fixed warmup longer than a
    small point's run would keep it at a low learning rate throughout)."""
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.trainer.max_steps = steps
        cfg.trainer.val_check_interval = max(1, min(int(cfg.trainer.val_check_interval), steps))
        fraction = cfg.sweep.get("warmup_fraction")
        if fraction is not None:
            cfg.optim.warmup_steps = max(1, round(float(fraction) * steps))


def run_flops(flops_per_token: Callable[[int], float], cfg: Any, steps: int) -> tuple[float, int]:
    """Training FLOPs and tokens of a run as its config describes it (``seq_len``, ``batch_size`` on each
    of the data-parallel processes, the optimizer's sequence-length warmup); ``flops_per_token(length)``
    from :mod:`core.accounting`."""
    from omegaconf import OmegaConf

    from core.training import OptimConfig, current_seq_len

    seq_len, batch = int(cfg.seq_len), int(cfg.batch_size) * data_parallel_size(cfg)
    optim_fields = OmegaConf.to_container(cfg.optim, resolve=True)
    optim = OptimConfig(**{**optim_fields, "max_steps": steps})  # type: ignore[dict-item]
    length_at = (lambda step: current_seq_len(step, seq_len, optim)) if optim.seq_len_warmup_steps > 0 else None
    return training_flops(flops_per_token, seq_len, batch, steps, length_at)


# --------------------------------------------------------------------------------------------------
# Point identity: the key that makes re-runs skip finished points
# --------------------------------------------------------------------------------------------------

# Paths of a point's config that do not change its result: where it writes, how it logs, how many
# workers feed it, whether it resumes. Paths absent from a domain's config are ignored.
BOOKKEEPING = (
    "run", "samples", "model",
    "sweep.dir", "sweep.families", "sweep.keep_checkpoints", "sweep.report", "sweep.description",
    "trainer.resume", "trainer.num_workers", "trainer.log_every_n_steps", "trainer.tensorboard",
    "trainer.val_check_interval", "trainer.limit_val_batches",
    "data.workers", "data.cache_dir",
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping) and value:
                out.update(flatten(value, path))
            else:
                out[path] = value
        return out
    return {prefix: tree}


def _excluded(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def stable_hash(data: Any, length: int = 16) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


@dataclass
class PointIdentity:
    """A point's coordinates (the swept keys), its settings (everything else that shapes its result)
    and the hashes of both."""

    coordinates: dict[str, Any]
    settings: dict[str, Any]
    key: str
    settings_key: str  # shared by the points of one sweep run with one config (the family aside)
    family_spec: Any = None

    def label(self) -> str:
        return " ".join(f"{k.split('.')[-1]}={v}" for k, v in self.coordinates.items())


def point_identity(resolved: Mapping[str, Any], coordinate_keys: Sequence[str],
                   family_spec: Any = None) -> PointIdentity:
    """The identity of a point from its resolved config (a plain dict).

    ``coordinate_keys`` are the swept keys (``point.family``, ``point.size``, ``seq_len``, ...);
    ``family_spec`` the point's own entry of ``sweep.families`` (the other families' entries are left
    out, so adding a family to a sweep does not invalidate the points already run).
    """
    flat = flatten(resolved)
    coordinates = {k: flat.get(k) for k in coordinate_keys}
    settings = {k: v for k, v in flat.items()
                if not _excluded(k, BOOKKEEPING) and k not in coordinates}
    key = stable_hash({"settings": settings, "coordinates": coordinates, "family_spec": family_spec})
    return PointIdentity(coordinates, settings, key, stable_hash(settings), family_spec)


# --------------------------------------------------------------------------------------------------
# The results table
# --------------------------------------------------------------------------------------------------

# The table's leading columns, in order; the domains' own metrics follow, sorted.
COLUMNS = (
    "family", "size", "seq_len", "eval_loss", "loss_unit", "eval_split",
    "params_total", "params_non_embedding", "params_active", "tokens", "flops", "flops_per_token",
    "d_model", "n_layers", "pattern", "recipe", "template", "target_params", "count", "batch_size", "steps",
    "train_seconds", "point_seconds", "device", "host", "finished_at", "sweep", "domain", "run_dir", "config",
    "key", "settings_key",
)
_RECORD_ONLY = ("settings", "coordinates", "family_spec", "resolved_config")  # in the JSON records only


class ResultsTable:
    """The records of one sweep folder: ``results/<key>.json`` per finished point, joined into
    ``results.csv``. Safe against crashes (records are written whole or not at all) and against
    concurrent points (SLURM arrays: a record is one file; the CSV is rebuilt under a lock)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.records_dir = self.folder / "results"
        self.csv_path = self.folder / "results.csv"

    def record_path(self, key: str) -> Path:
        return self.records_dir / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.record_path(key)
        if not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))

    def add(self, record: Mapping[str, Any]) -> Path:
        """Write ``record`` (must have ``key``) atomically, then rebuild the CSV."""
        key = record.get("key")
        if not key:
            raise ValueError("a results record needs its point's key")
        self.records_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record, indent=1, sort_keys=False, default=str) + "\n"
        path = atomic_write(self.record_path(str(key)), lambda tmp: tmp.write_text(text, encoding="utf-8"))
        self.rebuild()
        return path

    def records(self) -> list[dict[str, Any]]:
        """Every finished point's record, oldest first. Temporary files of writes in progress are skipped."""
        if not self.records_dir.is_dir():
            return []
        out = []
        for path in sorted(self.records_dir.glob("*.json")):
            try:
                out.append(json.loads(path.read_text(encoding="utf-8")))
            except json.JSONDecodeError as error:  # not ours: records are renamed into place whole
                raise ValueError(f"{path} is not a complete results record ({error}); it was not written by a "
                                 "sweep point (those are renamed into place whole): move it away") from error
        return sorted(out, key=lambda r: (str(r.get("finished_at", "")), str(r.get("key"))))

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".results.lock", "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def rebuild(self) -> Path:
        """Rewrite ``results.csv`` from the records (whole, under a temporary name, then renamed)."""
        with self._lock():
            records = self.records()
            extra = sorted({k for r in records for k in r} - set(COLUMNS) - set(_RECORD_ONLY))
            columns = list(COLUMNS) + extra
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            for record in records:
                writer.writerow({k: _cell(record.get(k)) for k in columns})
            text = buffer.getvalue()
            return atomic_write(self.csv_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return value


# --------------------------------------------------------------------------------------------------
# Running one point
# --------------------------------------------------------------------------------------------------

def host_and_device() -> tuple[str, str]:
    """This machine's name and the device a point trains on (GPU name or CPU threads)."""
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return socket.gethostname(), device


def finish_record(identity: PointIdentity, fields: Mapping[str, Any], *, sweep: str, domain: str,
                  started: float, run_dir: Path, folder: Path, resolved_config: Any) -> dict[str, Any]:
    """The record of a finished point: its fields plus the identity and bookkeeping columns."""
    host, device = host_and_device()
    relative = os.path.relpath(run_dir, folder)
    record: dict[str, Any] = dict(fields)
    record.update(
        key=identity.key, settings_key=identity.settings_key, sweep=sweep, domain=domain,
        point_seconds=round(time.perf_counter() - started, 2),
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), host=host, device=device,
        run_dir=relative, config=os.path.join(relative, "config.yaml"),
        coordinates=identity.coordinates, settings=identity.settings, family_spec=identity.family_spec,
        resolved_config=resolved_config,
    )
    return record


# --------------------------------------------------------------------------------------------------
# The power-law fit
# --------------------------------------------------------------------------------------------------

@dataclass
class PowerLawFit:
    """``y = a * x^-b + c`` fitted by least squares; ``*_std`` are standard errors (nan where the data
    leave no residual degrees of freedom); ``ok`` is False when no fit was possible (``note`` says why)."""

    n: int
    ok: bool = False
    a: float = math.nan
    b: float = math.nan
    c: float = math.nan
    a_std: float = math.nan
    b_std: float = math.nan
    c_std: float = math.nan
    rms: float = math.nan  # root mean square residual
    x_ref: float = math.nan  # the geometric mean of x: a * x^-b = A * (x / x_ref)^-b with A = a * x_ref^-b
    note: str = ""

    def predict(self, x: Any) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        amplitude = self.a * self.x_ref ** (-self.b)
        return amplitude * (x / self.x_ref) ** (-self.b) + self.c

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in dataclasses.asdict(self).items()}


def _linear_part(z: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """For fixed b (z = (x/x_ref)^-b): the least-squares (A, c) of y = A z + c with A >= 0, c >= 0,
    and the residual sum of squares."""
    zm, ym = z.mean(), y.mean()
    var = float(((z - zm) ** 2).sum())
    if var > 0:
        amplitude = float(((z - zm) * (y - ym)).sum() / var)
        offset = float(ym - amplitude * zm)
    else:
        amplitude, offset = 0.0, float(ym)
    if offset < 0:  # the bound c >= 0: a pure power law through the origin
        offset = 0.0
        amplitude = float((z * y).sum() / max(float((z * z).sum()), 1e-300))
    if amplitude < 0:  # the bound a >= 0: a constant
        amplitude, offset = 0.0, max(float(ym), 0.0)
    residual = y - (amplitude * z + offset)
    return amplitude, offset, float((residual ** 2).sum())


def fit_power_law(x: Sequence[float], y: Sequence[float], b_max: float = 4.0) -> PowerLawFit:
    """Fit ``y = a * x^-b + c`` (a, b, c >= 0) by least squares on y, with x on a log scale.

    For a fixed exponent b the model is linear in (a, c), so the fit is a one-dimensional search over b
    (a log-spaced grid over (0, b_max], refined by golden section) with (a, c) solved exactly at each b
    (variable projection: no starting point to guess, no local minimum from a bad one). Standard errors
    come from the Jacobian at the optimum, ``cov = s^2 (J^T J)^-1`` with ``s^2 = RSS / (n - k)``, ``k``
    the free parameters (a parameter at its bound 0 is held fixed). Needs 3 points; with exactly as
    many points as free parameters the fit is exact and the errors are nan.
    """
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(xs)
    if n != len(ys):
        raise ValueError(f"fit_power_law: {n} x values but {len(ys)} y values")
    if n < 3:
        return PowerLawFit(n=n, note=f"{n} point{'s' if n != 1 else ''}: a*x^-b + c has 3 parameters and needs "
                                     "at least 3 points (4 for error bars); add points to the sweep")
    if np.any(~np.isfinite(xs)) or np.any(xs <= 0) or np.any(~np.isfinite(ys)):
        raise ValueError("fit_power_law: x must be positive and finite, y finite")
    if np.unique(xs).size < 3:
        return PowerLawFit(n=n, note=f"only {np.unique(xs).size} distinct x values: at least 3 are needed")
    x_ref = float(np.exp(np.log(xs).mean()))
    u = np.log(xs / x_ref)

    def sse(b: float) -> float:
        return _linear_part(np.exp(-b * u), ys)[2]

    grid = np.geomspace(1e-4, b_max, 600)
    values = np.array([sse(b) for b in grid])
    i = int(values.argmin())
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    p, q = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fp, fq = sse(p), sse(q)
    for _ in range(200):
        if hi - lo < 1e-12 * max(1.0, hi):
            break
        if fp < fq:
            hi, q, fq = q, p, fp
            p = hi - golden * (hi - lo)
            fp = sse(p)
        else:
            lo, p, fp = p, q, fq
            q = lo + golden * (hi - lo)
            fq = sse(q)
    b = float((lo + hi) / 2)
    z = np.exp(-b * u)
    amplitude, c, rss = _linear_part(z, ys)
    a = amplitude * x_ref ** b
    notes = []
    if amplitude == 0.0:
        return PowerLawFit(n=n, ok=False, c=c, x_ref=x_ref, rms=math.sqrt(rss / n),
                           note="the loss does not decrease with x: no power law (a = 0)")
    if b >= b_max * 0.999:
        notes.append(f"b at the search bound {b_max}")
    free = ["A", "b"] + (["c"] if c > 0 else [])
    if c == 0:
        notes.append("c at its bound 0 (held fixed)")
    columns = {"A": z, "b": -amplitude * u * z, "c": np.ones_like(z)}
    jac = np.stack([columns[name] for name in free], axis=1)
    dof = n - len(free)
    std = {name: math.nan for name in ("A", "b", "c")}
    cov = None
    if dof > 0:
        s2 = rss / dof
        try:
            cov = s2 * np.linalg.inv(jac.T @ jac)
        except np.linalg.LinAlgError:
            notes.append("singular Jacobian: no error bars")
        if cov is not None:
            for i_name, name in enumerate(free):
                std[name] = float(math.sqrt(max(cov[i_name, i_name], 0.0)))
    else:
        notes.append(f"{n} points for {len(free)} free parameters: exact fit, no error bars (add points)")
    a_std = math.nan
    if cov is not None:
        # a = A * x_ref^b: the delta method on (A, b).
        grad = np.array([x_ref ** b, a * math.log(x_ref)])
        a_std = float(math.sqrt(max(grad @ cov[:2, :2] @ grad, 0.0)))
    return PowerLawFit(n=n, ok=True, a=a, b=b, c=c, a_std=a_std, b_std=std["b"],
                       c_std=std["c"] if c > 0 else 0.0, rms=math.sqrt(rss / n), x_ref=x_ref, note="; ".join(notes))


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------

# What the report can put on the x axis: the record column and its axis label.
X_AXES: dict[str, tuple[str, str]] = {
    "flops": ("flops", "training FLOPs (core.accounting)"),
    "parameters": ("params_non_embedding", "non-embedding parameters"),
    "params_total": ("params_total", "parameters (total)"),
    "tokens": ("tokens", "training tokens"),
    "seq_len": ("seq_len", "context length (tokens a window)"),
}


@dataclass
class Series:
    """The points of one family (and one value of each setting the table's records differ in)."""

    label: str
    family: str
    records: list[dict[str, Any]] = field(default_factory=list)


def group_series(records: list[dict[str, Any]]) -> tuple[list[Series], list[str]]:
    """Group records by family, by the settings they differ in and by the family's template where one
    family was run with several; returns the series and the names of the differing settings (empty when
    every record was run with the same settings)."""

    def text(value: Any) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    varying: list[str] = []
    if len({r.get("settings_key") for r in records}) > 1:
        keys = sorted({k for r in records for k in (r.get("settings") or {})})
        varying = [k for k in keys if len({text((r.get("settings") or {}).get(k)) for r in records}) > 1]
    specs: dict[str, set[str]] = {}
    for r in records:
        specs.setdefault(str(r.get("family")), set()).add(text(r.get("family_spec")))
    series: dict[tuple[str, str], Series] = {}
    for r in records:
        family = str(r.get("family"))
        tags = [f"{k}={(r.get('settings') or {}).get(k)}" for k in varying]
        if len(specs[family]) > 1:
            tags.append(f"template={r.get('template') or r.get('family_spec')}")
        tag = ", ".join(tags)
        label = f"{family} ({tag})" if tag else family
        series.setdefault((family, tag), Series(label=label, family=family)).records.append(r)
    return list(series.values()), varying


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e5 or abs(value) < 1e-3 else f"{value:.{digits}f}"
    return str(value)


def _with_error(value: float, std: float) -> str:
    if math.isnan(value):
        return "-"
    text = f"{value:.4g}"
    return f"{text} ± {std:.2g}" if not math.isnan(std) else text


def markdown_table(records: list[dict[str, Any]], metric_columns: Sequence[str] = ()) -> str:
    header = ["family", "size", "seq_len", "d_model", "blocks", "non-emb params", "total params", "tokens",
              "FLOPs", "eval loss", *metric_columns, "time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        cells = [str(r.get("family")), str(r.get("size")), str(r.get("seq_len")), str(r.get("d_model")),
                 str(r.get("n_layers")), f"{int(r['params_non_embedding']):,}", f"{int(r['params_total']):,}",
                 format_count(float(r["tokens"])), f"{float(r['flops']):.3g}", f"{float(r['eval_loss']):.4f}",
                 *[_fmt(r.get(c)) for c in metric_columns], f"{float(r.get('point_seconds') or 0):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sort_key(r: dict[str, Any]) -> tuple:
    return (str(r.get("family")), float(r.get("params_non_embedding") or 0), float(r.get("seq_len") or 0),
            float(r.get("flops") or 0))


def plot_series(series: list[Series], x_name: str, path: Path, fits: Mapping[str, PowerLawFit], title: str,
                loss_unit: str) -> Path:
    """One log-log plot of eval loss against ``x_name`` (a key of :data:`X_AXES`), one line a series,
    with the fitted curve dashed where there is one; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    column, axis_label = X_AXES[x_name]
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(series):
        color = colors[i % len(colors)]
        points = sorted((float(r[column]), float(r["eval_loss"])) for r in s.records)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, "o-", color=color, label=s.label, linewidth=1.2, markersize=4)
        fit = fits.get(s.label)
        if fit is not None and fit.ok and len(xs) > 1:
            grid = np.geomspace(min(xs), max(xs), 100)
            ax.plot(grid, fit.predict(grid), "--", color=color, linewidth=0.9, alpha=0.8,
                    label=f"  fit: b = {fit.b:.3g}, c = {fit.c:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Losses span a fraction of a decade, where a log axis has no decade ticks: a few round values,
    # as plain numbers.
    low, high = ax.get_ylim()
    ticks = [t for t in matplotlib.ticker.MaxNLocator(6).tick_values(low, high) if low <= t <= high and t > 0]
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(axis_label)
    ax.set_ylabel(f"eval loss ({loss_unit})")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def report(folder: str | os.PathLike, *, title: str = "", fit_x: Sequence[str] = ("flops",),
           plot_x: Sequence[str] = ("flops", "parameters"), expected: Sequence[Mapping[str, Any]] = (),
           metric_columns: Sequence[str] = ()) -> dict[str, Any]:
    """Read a sweep folder's records, fit, print and save the report.

    ``fit_x``: the x axes (keys of :data:`X_AXES`) to fit a power law against, per series; ``plot_x``:
    the plots to draw (loss against each); ``expected``: the sweep's grid (one mapping of coordinate
    -> value per point), to list the points not run yet; ``metric_columns``: domain metrics for the
    table. Writes ``<folder>/report/`` (``table.md``, ``fits.json``, ``loss_vs_<x>.png``) and rebuilds
    ``results.csv``. Returns ``{"text", "fits", "plots", "missing"}``.
    """
    folder = Path(folder)
    table = ResultsTable(folder)
    records = table.records()
    if not records:
        raise FileNotFoundError(f"no finished sweep points under {table.records_dir}: run the sweep first "
                                "(python -m domains.<domain> sweep sweep=<name>), with the same sweep.dir")
    table.rebuild()
    for name in (*fit_x, *plot_x):
        if name not in X_AXES:
            raise ValueError(f"sweep.report: unknown axis {name!r}; choose from {list(X_AXES)}")
    records = sorted(records, key=_sort_key)
    series, varying = group_series(records)
    units = sorted({str(r.get("loss_unit")) for r in records})
    loss_unit = units[0] if len(units) == 1 else "/".join(units)
    out_dir = folder / "report"
    lines = [f"# {title or folder.name}: {len(records)} finished points in {folder}", ""]
    if varying:
        lines += [f"The records were run with different settings ({', '.join(varying)}): each combination is "
                  "its own series.", ""]
    lines += [markdown_table(records, metric_columns), ""]

    fits: dict[str, dict[str, PowerLawFit]] = {}
    for x_name in fit_x:
        column = X_AXES[x_name][0]
        fits[x_name] = {}
        lines += [f"Power law fits `loss = a * x^-b + c`, x = {X_AXES[x_name][1]} (± standard errors; "
                  "`a x^-b` at the geometric mean of the series' x, the reducible loss there, reads "
                  "better than a):", "",
                  "| series | points | a | b | c | a x^-b at x_ref | x_ref | rms residual | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in series:
            fit = fit_power_law([float(r[column]) for r in s.records], [float(r["eval_loss"]) for r in s.records])
            fits[x_name][s.label] = fit
            if fit.ok:
                lines.append(f"| {s.label} | {fit.n} | {_with_error(fit.a, fit.a_std)} | "
                             f"{_with_error(fit.b, fit.b_std)} | {_with_error(fit.c, fit.c_std)} | "
                             f"{fit.a * fit.x_ref ** -fit.b:.3g} | {fit.x_ref:.3g} | {fit.rms:.3g} | {fit.note} |")
            else:
                lines.append(f"| {s.label} | {fit.n} | - | - | - | - | - | - | no fit: {fit.note} |")
        lines.append("")

    missing = []
    done = [r.get("coordinates") or {} for r in records]
    for point in expected:
        if not any(all(str(d.get(k)) == str(v) for k, v in point.items()) for d in done):
            missing.append(dict(point))
    if missing:
        shown = [f"- {' '.join(f'{k}={v}' for k, v in m.items())}" for m in missing[:12]]
        if len(missing) > 12:
            shown.append(f"- ... and {len(missing) - 12} more")
        lines += [f"{len(missing)} point(s) of the sweep's grid not finished yet:", *shown, ""]

    plots = []
    for x_name in plot_x:
        plots.append(plot_series(series, x_name, out_dir / f"loss_vs_{x_name}.png", fits.get(x_name, {}),
                                 f"{title or folder.name}: eval loss vs {X_AXES[x_name][1]}", loss_unit))
    lines += ["Plots: " + ", ".join(str(p) for p in plots), f"Table: {table.csv_path}"]
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "table.md", lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
    fits_json = json.dumps({x: {label: f.to_dict() for label, f in per.items()} for x, per in fits.items()}, indent=1)
    atomic_write(out_dir / "fits.json", lambda tmp: tmp.write_text(fits_json + "\n", encoding="utf-8"))
    print(text)
    return {"text": text, "fits": fits, "plots": plots, "missing": missing}


# --------------------------------------------------------------------------------------------------
# Hydra glue shared by the domains' sweep commands
# --------------------------------------------------------------------------------------------------

def sweep_argv(argv: Sequence[str]) -> list[str]:
    """``<prog> sweep report ...`` -> ``<prog> sweep-report ...`` (both spellings name the report), and a
    bare sweep name after it -> ``sweep=<name>``."""
    argv = list(argv)
    if len(argv) >= 3 and argv[1] == "sweep" and argv[2] == "report":
        argv = [argv[0], "sweep-report", *argv[3:]]
    if len(argv) >= 3 and argv[1] == "sweep-report" and "=" not in argv[2] and not argv[2].startswith("-"):
        argv[2] = f"sweep={argv[2]}"  # `sweep report cpu` names the sweep, as `sweep cpu` does
    return argv


def sweep_grid(command_line: Sequence[str] = ()) -> tuple[list[str], list[dict[str, Any]]]:
    """The swept keys and the grid of the running Hydra app: ``hydra.sweeper.params``, with the sweeps
    of ``command_line`` (the multirun's own overrides, e.g. ``point.size=1M,2M``) replacing those of the
    same key, as Hydra's basic sweeper combines them; ``([], [])`` outside a Hydra app. Values are typed
    as Hydra parses them (``256`` an int, ``5e6`` a float, ``25K`` a string), as a point's config has them."""
    import itertools

    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return [], []
    params = HydraConfig.get().sweeper.get("params") or {}
    parser = OverridesParser.create()
    grid: dict[str, list[Any]] = {}
    configured = parser.parse_overrides([f"{k}={v}" for k, v in params.items()])
    for override in configured + parser.parse_overrides(list(command_line)):
        key = override.get_key_element()
        if override.is_sweep_override():
            grid[key] = list(override.sweep_iterator())
        elif key in grid:  # a single value on the command line replaces a configured sweep
            grid[key] = [override.value()]
    keys = list(grid)
    return keys, [dict(zip(keys, combo)) for combo in itertools.product(*grid.values())]


def multirun_overrides() -> list[str]:
    """The command-line overrides of the running multirun (from the ``multirun.yaml`` Hydra's sweeper
    writes into ``hydra.sweep.dir`` when it starts); empty when there is none."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return []
    path = Path(str(HydraConfig.get().sweep.dir)) / "multirun.yaml"
    if not path.is_file():
        return []
    saved = OmegaConf.load(path)
    return [str(o) for o in OmegaConf.select(saved, "hydra.overrides.task", default=[]) or []]


def family_spec(cfg: Any, family: str, default_key: str = "preset") -> dict[str, Any]:
    """``sweep.families[family]`` as ``{"recipe": ..., <default_key>: ...}``: a bare string names the
    template (the recipe is then the family's own name)."""
    from omegaconf import DictConfig, OmegaConf

    families = cfg.sweep.get("families") or {}
    if family not in families:
        raise ValueError(f"point.family={family!r} is not a family of sweep {cfg.sweep.name!r}; its families: "
                         f"{list(families)} (sweep.families in the sweep's config)")
    entry = families[family]
    if isinstance(entry, DictConfig):
        spec = dict(OmegaConf.to_container(entry, resolve=True))  # type: ignore[arg-type]
    else:
        spec = {default_key: entry}
    spec.setdefault("recipe", family)
    if default_key not in spec:
        raise ValueError(f"sweep.families.{family} needs a {default_key!r} (the model it scales), got {spec}")
    return spec


DEFAULT_COORDINATES = ("point.family", "point.size")


@dataclass
class PointContext:
    """What a domain's point runner gets besides the point's config."""

    family: str
    spec: dict[str, Any]  # the family's sweep.families entry, with its recipe
    identity: PointIdentity
    run_dir: Path
    index: int | None  # position in the sweep's grid (0-based), None outside a multirun
    total: int | None

    def tag(self, name: str) -> str:
        where = "" if self.index is None else f" {self.index + 1}" + (f"/{self.total}" if self.total else "")
        return f"[sweep {name}{where}] {self.identity.label()}"


def run_point(cfg: Any, domain: str, execute: Callable[[Any, PointContext], Mapping[str, Any]],
              template_key: str = "preset",
              template_content: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run one point of a sweep (the body of every domain's ``sweep`` command), or skip it if finished.

    ``execute(point_cfg, context)`` trains and evaluates: it receives a copy of the point's config whose
    ``run.dir`` is the point's folder (``<sweep.dir>/points/<label>-<key>``) and ``trainer.resume`` is
    ``last`` when an interrupted attempt left a checkpoint there; it edits that copy into the domain's
    training config (model, steps) and returns the record's fields (model, parameters, FLOPs, tokens,
    ``eval_loss``, metrics). Its final config is stored in the record. Then the record is written and the
    table rebuilt; nothing is written for a point that raises. ``template_content(name)`` gives what the
    family's template is (a preset's fields, a spec file's content): it is part of the key, so editing a
    preset re-runs its points instead of skipping them.
    """
    from omegaconf import OmegaConf, open_dict

    started = time.perf_counter()
    keys, grid = sweep_grid(multirun_overrides())
    coordinate_keys = keys or list(DEFAULT_COORDINATES)
    family = None if OmegaConf.is_missing(cfg.point, "family") else cfg.point.get("family")
    if family is None:
        raise ValueError("point.family is not set: run the sweep as a multirun (its sweep file sets "
                         "hydra.sweeper.params), or name one point: point.family=<family> point.size=<size>")
    spec = family_spec(cfg, str(family), template_key)
    bare = OmegaConf.to_container(cfg, resolve=False)
    bare.pop("run", None)  # run.name interpolates Hydra's runtime choices; it is bookkeeping anyway
    resolved = OmegaConf.to_container(OmegaConf.create(bare), resolve=True)
    template = None if template_content is None else template_content(str(spec[template_key]))
    identity = point_identity(resolved, coordinate_keys, {**spec, "template": template})  # type: ignore[arg-type]
    folder = Path(str(cfg.sweep.dir))
    table = ResultsTable(folder)
    in_grid = any(all(str(identity.coordinates.get(k)) == str(v) for k, v in g.items()) for g in grid)
    index = _job_number()
    slug = re.sub(r"[^A-Za-z0-9.+_-]+", "_", "-".join(str(v) for v in identity.coordinates.values()))
    context = PointContext(family=str(family), spec=spec, identity=identity,
                           run_dir=folder / "points" / f"{slug}-{identity.key}", index=index,
                           total=len(grid) if in_grid else None)
    tag = context.tag(str(cfg.sweep.name))
    existing = table.get(identity.key)
    if existing is not None:
        print(f"{tag}: finished before (eval loss {existing.get('eval_loss')}), skipped "
              f"[{table.record_path(identity.key)}]", flush=True)
        return existing

    point_cfg = OmegaConf.create(bare)
    resume = context.run_dir / "checkpoints" / "last.ckpt"
    with open_dict(point_cfg):
        point_cfg.run = {"name": f"{cfg.sweep.name}/{context.run_dir.name}", "dir": str(context.run_dir),
                         "seed": cfg.run.seed}
        point_cfg.trainer.resume = "last" if resume.is_file() else None
    resuming = " (resuming its last checkpoint)" if resume.is_file() else ""
    print(f"{tag}: starting in {context.run_dir}{resuming}", flush=True)
    fields = dict(execute(point_cfg, context))
    missing = [k for k in ("eval_loss", "params_total", "params_non_embedding", "params_active", "flops", "tokens")
               if fields.get(k) is None]
    if missing:
        raise AssertionError(f"the {domain} sweep runner returned no {missing}")
    fields.setdefault("family", str(family))
    fields.setdefault("size", None if cfg.point.get("size") is None else str(cfg.point.size))
    record = finish_record(identity, fields, sweep=str(cfg.sweep.name), domain=domain, started=started,
                           run_dir=context.run_dir, folder=folder,
                           resolved_config=OmegaConf.to_container(point_cfg, resolve=True))
    table.add(record)
    if not cfg.sweep.get("keep_checkpoints", False):
        import shutil

        shutil.rmtree(context.run_dir / "checkpoints", ignore_errors=True)
    print(f"{tag}: eval loss {float(fields['eval_loss']):.4f} {fields.get('loss_unit', '')}, "
          f"{int(fields['params_non_embedding']):,} non-embedding parameters, "
          f"{format_count(float(fields['tokens']))} tokens, {float(fields['flops']):.3g} FLOPs, "
          f"{record['point_seconds']:.0f} s -> {table.csv_path}", flush=True)
    _release_memory()
    return record


def _job_number() -> int | None:
    """This job's number in the running multirun (0-based), None outside one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or OmegaConf.is_missing(hydra_cfg.job, "num"):
        return None
    return int(hydra_cfg.job.num)


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def report_command(cfg: Any, metric_columns: Sequence[str] = ()) -> dict[str, Any]:
    """The body of every domain's ``sweep report``: the report of ``cfg.sweep.dir`` with the sweep's own
    axes (``sweep.report.fit_x`` / ``plot_x``) and its grid."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(cfg.sweep.get("report") or {}, resolve=True) or {}
    _, grid = sweep_grid()
    return report(Path(str(cfg.sweep.dir)), title=f"sweep {cfg.sweep.name}",
                  fit_x=list(settings.get("fit_x", ["flops"])),  # type: ignore[union-attr]
                  plot_x=list(settings.get("plot_x", ["flops", "parameters"])),  # type: ignore[union-attr]
                  expected=grid, metric_columns=metric_columns)
