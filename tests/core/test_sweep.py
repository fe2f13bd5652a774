"""core.sweep without training: size derivation against the presets and built models, token budgets and
FLOPs, point keys, the crash-safe results table, the power-law fit (against known parameters and against
scipy's curve_fit) and the report's files."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from core.accounting import count_parameters, training_flops_per_token
from core.backbone import CausalLM
from core.presets import get_preset
from core.sweep import (
    LADDER, PAPER_GRID, RECIPES, ResultsTable, apply_batch_rule, data_parallel_size, derive_model, fit_power_law,
    model_overrides, parse_count, point_identity, report, run_flops, steps_for, sweep_argv, token_budget,
    training_flops, with_width,
)
from core.training import OptimConfig, current_seq_len

TINY_TEMPLATES = {"mamba1": "mamba1-tiny", "mamba2": "mamba2-tiny", "transformer++": "transformer++-tiny",
                  "hyena": "hyena-tiny", "hybrid": "hybrid-tiny"}


# --------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------

def test_parse_count():
    assert parse_count("30K") == 30_000 and parse_count("1.5m") == 1_500_000 and parse_count("2B") == 2e9
    assert parse_count(125) == 125 and parse_count("2.5e6") == 2.5e6 and parse_count(" 7 k ") == 7000
    for bad in ("abc", "-3", "0", True, "1.5X"):
        with pytest.raises(ValueError):
            parse_count(bad)


@pytest.mark.parametrize("label", sorted(PAPER_GRID))
def test_paper_grid_labels_give_the_presets_shapes(label):
    """At a Mamba-paper grid label every family with a preset there gets that preset's exact shape, and
    the Transformer++ has half the blocks' worth of layers of the Mamba stacks at the same width."""
    shapes = {}
    for recipe, name in PAPER_GRID[label].items():
        template = get_preset(f"{recipe}-130m" if recipe != "transformer++" else "transformer++-125m")
        derived = derive_model(template, recipe, label)
        preset = get_preset(name)
        assert (derived.config.d_model, derived.config.pattern) == (preset.d_model, preset.pattern)
        assert count_parameters(derived.config).total == count_parameters(preset).total
        shapes[recipe] = derived.config
    # A Transformer++ layer is two blocks ('*-'): the Mamba stacks have twice its layers.
    assert shapes["mamba1"].n_layers == 2 * (shapes["transformer++"].n_layers // 2)
    assert shapes["mamba1"].d_model == shapes["transformer++"].d_model == shapes["mamba2"].d_model


@pytest.mark.parametrize("target", [5e6, 20e6])
def test_matched_sizes_share_the_width_and_hit_the_target(target):
    """Numeric targets: every family at the ladder width, its count within 25% of the target, and no
    other depth nearer (checked by brute force); Mamba ends up with ~2x the Transformer++ layers."""
    templates = {"mamba1": "mamba1-130m", "mamba2": "mamba2-130m", "transformer++": "transformer++-125m",
                 "hyena": "hyena-153m", "hybrid": "hybrid-130m"}
    derived = {r: derive_model(get_preset(templates[r]), r, target) for r in RECIPES}
    widths = {d.config.d_model for d in derived.values()}
    assert len(widths) == 1 and widths.pop() in {d for d, _ in LADDER}
    for recipe, d in derived.items():
        params = count_parameters(d.config).non_embedding
        assert params == d.params and abs(math.log(params / target)) < math.log(1.25), (recipe, params)
        errors = []
        for units in range(RECIPES[recipe].min_units, 80):
            config = with_width(d.config, d.config.d_model)
            config.pattern = RECIPES[recipe].pattern(units)
            errors.append(abs(math.log(count_parameters(config).non_embedding / target)))
        assert abs(math.log(params / target)) == pytest.approx(min(errors))
    mamba_layers = derived["mamba1"].config.n_layers
    transformer_layers = derived["transformer++"].config.n_layers // 2
    assert 1.6 <= mamba_layers / transformer_layers <= 2.4


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("size", ["40K", "150K"])
def test_derived_models_build_and_count_as_accounted(recipe, size):
    """The derived shapes are valid models (heads, groups, MLP widths) whose built parameter count is the
    accounting's; get_preset with the derived overrides rebuilds the same config."""
    template = get_preset(TINY_TEMPLATES[recipe], vocab_size=300)
    derived = derive_model(template, recipe, size)
    model = CausalLM(derived.config)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(derived.config).total
    rebuilt = get_preset(TINY_TEMPLATES[recipe], vocab_size=300, **model_overrides(template, derived.config))
    assert rebuilt == derived.config
    if recipe == "hybrid":
        assert "*" in derived.config.pattern and "M" in derived.config.pattern


def test_with_width_keeps_head_width_gqa_and_mlp_ratio():
    template = get_preset("hybrid-tiny")  # 4 heads of 16, 2 KV heads, GELU MLP 4 d, Mamba-2 headdim 16, 2 groups
    wide = with_width(template, 128)
    assert (wide.attention.n_heads, wide.attention.n_kv_heads) == (8, 4)
    assert wide.mlp.hidden_size == 4 * 128 and wide.mamba2.headdim == 16 and wide.mamba2.ngroups == 2
    with pytest.raises(ValueError, match="head width"):
        with_width(get_preset("transformer++-125m"), 96)


def test_template_size_and_errors():
    template = get_preset("mamba1-tiny")
    assert derive_model(template, "mamba1", None).config == template
    with pytest.raises(ValueError, match="unknown sweep recipe"):
        derive_model(template, "mamba3", "1M")
    with pytest.raises(ValueError, match="sweep.count"):
        derive_model(template, "mamba1", "1M", count="embedding")


# --------------------------------------------------------------------------------------------------
# Tokens and FLOPs
# --------------------------------------------------------------------------------------------------

def test_token_budget_and_steps():
    assert token_budget({"rule": "fixed", "value": "2M"}) == 2_000_000
    assert token_budget({"rule": "chinchilla", "per_param": 20}, 12_345) == 246_900
    with pytest.raises(ValueError, match="rule"):
        token_budget({"rule": "kaplan"})
    assert steps_for(1000, 4, 32) == 8 and steps_for(1, 4, 32) == 1


def test_batch_rule_counts_every_data_parallel_process():
    from omegaconf import OmegaConf

    def config(devices, per_batch, seq_len=1024):
        return OmegaConf.create({"sweep": {"tokens_per_batch": per_batch}, "seq_len": seq_len, "batch_size": 8,
                                 "trainer": {"devices": devices, "num_nodes": 1}, "optim": {}})

    single, multi, unset = config(1, "64K"), config(4, 65536), config(1, None)  # 64K = 64,000
    assert apply_batch_rule(single) == 62 and apply_batch_rule(multi) == 16 and apply_batch_rule(unset) == 8
    assert data_parallel_size(multi) == 4 and data_parallel_size(config("auto", None)) == 1
    with pytest.raises(ValueError, match="tokens_per_batch"):
        apply_batch_rule(config(4, 2048))
    # FLOPs and tokens count the global batch: 4 processes x 16 windows.
    flops, tokens = run_flops(lambda n: 10.0, multi, steps=3)
    assert tokens == 3 * 4 * 16 * 1024 and flops == 10.0 * tokens


def test_training_flops_with_sequence_length_warmup():
    config = get_preset("transformer++-tiny")  # attention: FLOPs per token depend on the length
    optim = OptimConfig(seq_len_warmup_steps=5, seq_len_warmup_start=16, max_steps=8)
    flops, tokens = training_flops(lambda n: training_flops_per_token(config, n, 2), 64, 2, 8,
                                   lambda step: current_seq_len(step, 64, optim))
    lengths = [current_seq_len(s, 64, optim) for s in range(8)]
    assert tokens == sum(2 * n for n in lengths) and lengths[0] == 16 and lengths[-1] == 64
    assert flops == pytest.approx(sum(training_flops_per_token(config, n, 2) * 2 * n for n in lengths))
    flat, flat_tokens = training_flops(lambda n: training_flops_per_token(config, n, 2), 64, 2, 8)
    assert flat_tokens == 8 * 2 * 64 and flat == pytest.approx(training_flops_per_token(config, 64, 2) * 1024)


# --------------------------------------------------------------------------------------------------
# Point identity and the results table
# --------------------------------------------------------------------------------------------------

def _config(**changes):
    cfg = {"sweep": {"name": "s", "dir": "/a", "families": {"m": "mamba1-tiny", "t": "transformer++-tiny"},
                     "tokens": {"rule": "fixed", "value": "1M"}},
           "point": {"family": "m", "size": "1M"}, "trainer": {"max_steps": 10, "num_workers": 0},
           "optim": {"lr": 0.003}, "data": {"cache_dir": "x", "vocab_size": 300}, "seq_len": 128}
    for path, value in changes.items():
        node = cfg
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def test_point_key_ignores_bookkeeping_and_other_families():
    coords = ["point.family", "point.size"]
    base = point_identity(_config(), coords, "mamba1-tiny")
    assert point_identity(_config(data__cache_dir="elsewhere", trainer__num_workers=8,
                                  sweep__dir="/b"), coords, "mamba1-tiny").key == base.key
    families = {"m": "mamba1-tiny", "t": "transformer++-tiny", "h": "hyena-tiny"}
    assert point_identity(_config(sweep__families=families), coords, "mamba1-tiny").key == base.key
    assert point_identity(_config(optim__lr=0.001), coords, "mamba1-tiny").key != base.key
    other = point_identity(_config(point__size="2M"), coords, "mamba1-tiny")
    assert other.key != base.key and other.settings_key == base.settings_key
    changed = point_identity(_config(), coords, "mamba1-small")  # the family's template changed
    assert changed.key != base.key and changed.settings_key == base.settings_key
    assert base.coordinates == {"point.family": "m", "point.size": "1M"}


def test_results_table_is_atomic_and_joined(tmp_path: Path, monkeypatch):
    table = ResultsTable(tmp_path)
    assert table.records() == [] and table.get("abc") is None
    table.add({"key": "k1", "family": "m", "eval_loss": 3.5, "flops": 1e12, "finished_at": "1", "extra_metric": 1})
    table.add({"key": "k2", "family": "t", "eval_loss": 3.25, "flops": 2e12, "finished_at": "2"})
    assert [r["key"] for r in table.records()] == ["k1", "k2"]
    lines = table.csv_path.read_text().splitlines()
    assert lines[0].startswith("family,size,seq_len,eval_loss") and lines[0].endswith("extra_metric")
    assert len(lines) == 3 and ",3.5," in lines[1]

    # A crash while a record is written leaves neither the record nor a temporary file, nor a changed CSV.
    before = table.csv_path.read_text()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        table.add({"key": "k3", "family": "m", "eval_loss": 3.0, "finished_at": "3"})
    monkeypatch.undo()
    assert table.get("k3") is None and sorted(p.name for p in table.records_dir.iterdir()) == ["k1.json", "k2.json"]
    assert table.csv_path.read_text() == before
    (table.records_dir / "k9.json").write_text('{"key": "k9", "fam')
    with pytest.raises(ValueError, match="not a complete results record"):
        table.records()


# --------------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------------

A, B, C = 2.0e3, 0.3, 1.8  # loss(C) = 2000 C^-0.3 + 1.8 over 1e10..1e15 FLOPs: 2.28 down to 1.85


def test_fit_recovers_exact_parameters():
    x = np.geomspace(1e10, 1e15, 8)
    fit = fit_power_law(x, A * x ** -B + C)
    assert fit.ok and fit.n == 8
    assert fit.a == pytest.approx(A, rel=1e-5) and fit.b == pytest.approx(B, rel=1e-6)
    assert fit.c == pytest.approx(C, rel=1e-7) and fit.rms < 1e-9
    assert fit.predict([1e12])[0] == pytest.approx(A * 1e12 ** -B + C, rel=1e-9)


def test_fit_with_noise_matches_scipy_and_covers_the_truth():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    x = np.geomspace(1e10, 1e15, 12)
    y = A * x ** -B + C + rng.normal(0, 0.004, x.size)
    fit = fit_power_law(x, y)
    # scipy: the same least-squares problem, parametrised in log10 x.
    u = np.log10(x)
    popt, pcov = optimize.curve_fit(lambda u, a, b, c: a * 10 ** (-b * u) + c, u, y, p0=(fit.a, fit.b, fit.c),
                                    maxfev=20000)
    assert fit.a == pytest.approx(popt[0], rel=1e-4) and fit.b == pytest.approx(popt[1], rel=1e-5)
    assert fit.c == pytest.approx(popt[2], rel=1e-5)
    std = np.sqrt(np.diag(pcov))
    for ours, theirs in ((fit.a_std, std[0]), (fit.b_std, std[1]), (fit.c_std, std[2])):
        assert ours == pytest.approx(theirs, rel=1e-3)
    for value, err, truth in ((fit.b, fit.b_std, B), (fit.c, fit.c_std, C)):
        assert abs(value - truth) < 4 * err


def test_fit_degenerate_inputs():
    two = fit_power_law([1e10, 1e11], [3.0, 2.9])
    assert not two.ok and "at least 3 points" in two.note
    three = fit_power_law([1e10, 1e11, 1e12], [3.0, 2.8, 2.7])
    assert three.ok and math.isnan(three.b_std) and "no error bars" in three.note
    assert three.predict([1e10, 1e11, 1e12]) == pytest.approx([3.0, 2.8, 2.7], abs=1e-6)
    rising = fit_power_law([1e10, 1e11, 1e12, 1e13], [2.0, 2.1, 2.3, 2.4])
    assert not rising.ok and "does not decrease" in rising.note
    x = np.geomspace(1e3, 1e6, 6)
    exact = fit_power_law(x, 50 * x ** -0.25)  # no floor: c found at 0
    assert exact.ok and exact.c == pytest.approx(0, abs=1e-9) and exact.b == pytest.approx(0.25, rel=1e-9)
    below = fit_power_law(x, 50 * x ** -0.25 - 0.05)  # the best c would be negative: held at its bound 0
    assert below.ok and below.c == 0 and below.c_std == 0 and "bound" in below.note and not math.isnan(below.b_std)
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([0, 1, 2], [1, 2, 3])


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------

def _record(key: str, family: str, flops: float, loss: float, lr: float = 0.003, **extra) -> dict:
    return {"key": key, "settings_key": f"s{lr}", "family": family, "size": "1M", "seq_len": 128, "d_model": 64,
            "n_layers": 4, "params_non_embedding": flops / 1e6, "params_total": flops / 1e6 + 1000,
            "tokens": 1e6, "flops": flops, "eval_loss": loss, "loss_unit": "nats/token", "point_seconds": 1.0,
            "finished_at": key, "settings": {"optim.lr": lr}, "family_spec": f"{family}-tiny",
            "coordinates": {"point.family": family, "point.size": f"{flops:g}"}, **extra}


def test_report_fits_each_family_and_writes_plots(tmp_path: Path):
    table = ResultsTable(tmp_path)
    x = np.geomspace(1e10, 1e13, 5)
    for i, flops in enumerate(x):
        table.add(_record(f"m{i}", "mamba", flops, A * flops ** -B + C))
        table.add(_record(f"t{i}", "transformer", flops, 2 * A * flops ** -B + C))
    table.add(_record("x0", "transformer", x[0], 9.0, lr=0.001))  # another setting: its own series
    expected = [{"point.family": "mamba", "point.size": f"{f:g}"} for f in x] + [
        {"point.family": "mamba", "point.size": "1e+14"}]
    out = report(tmp_path, title="test", fit_x=["flops"], plot_x=["flops", "parameters"], expected=expected)
    fits = out["fits"]["flops"]
    assert fits["mamba (optim.lr=0.003)"].b == pytest.approx(B, rel=1e-5)
    assert fits["transformer (optim.lr=0.003)"].a == pytest.approx(2 * A, rel=1e-4)
    assert not fits["transformer (optim.lr=0.001)"].ok
    assert out["missing"] == [{"point.family": "mamba", "point.size": "1e+14"}]
    for png in out["plots"]:
        data = Path(png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    saved = json.loads((tmp_path / "report" / "fits.json").read_text())
    assert saved["flops"]["mamba (optim.lr=0.003)"]["c"] == pytest.approx(C, rel=1e-6)
    assert "| mamba |" in (tmp_path / "report" / "table.md").read_text()
    assert len(table.csv_path.read_text().splitlines()) == 12


def test_report_without_records_names_the_fix(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="run the sweep first"):
        report(tmp_path)


def test_sweep_argv():
    assert sweep_argv(["p", "sweep", "report", "cpu", "x=1"]) == ["p", "sweep-report", "sweep=cpu", "x=1"]
    assert sweep_argv(["p", "sweep", "report", "sweep=cpu"]) == ["p", "sweep-report", "sweep=cpu"]
    assert sweep_argv(["p", "sweep", "cpu"]) == ["p", "sweep", "cpu"]
