"""``python -m domains.dna sweep`` end to end (in-process Hydra multirun) on a small synthetic alignment:
the shipped size sweep (2 families x 2 sizes) and context sweep (2 lengths at a fixed size, fixed tokens a
step) at a still smaller size, their records checked against the exports, and the reports."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from core.accounting import count_parameters, training_flops_per_token
from core.checkpoint import read_export_info
from core.cli import CONFIG_ROOT
from core.dna_presets import get_dna_preset
from core.sweep import ResultsTable, derive_model
from domains.dna.__main__ import main
from tests.domains.dna.conftest import write_maf


@pytest.fixture(scope="module")
def genome(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("genome") / "apes.maf"
    write_maf(path, n_blocks=40)
    return path


def data_overrides(path: Path, tmp: Path) -> list[str]:
    return [f"data.path={path}", "data.example=null", "data.segment_bases=1000", "data.val_fraction=0.2",
            "data.test_fraction=0.2", f"data.cache_dir={tmp / 'cache'}", "data.species=[Hsap,Ptro,Ggor]",
            f"sweep.dir={tmp / 'sweep'}", "trainer.log_every_n_steps=1"]


def run_cli(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # run_command rewrites sys.argv for Hydra
    main(["domains.dna", *args])


def test_size_sweep(genome: Path, tmp_path: Path, monkeypatch, capsys):
    run_cli(monkeypatch, "sweep", "size-cpu", *data_overrides(genome, tmp_path), "point.family=mamba1,hyena",
            "point.size=25K,50K", "sweep.tokens.value=1K", "seq_len=64", "sweep.eval.tokens=256")
    assert "[sweep size-cpu 4/4] size=50K family=hyena: eval loss" in capsys.readouterr().out
    records = ResultsTable(tmp_path / "sweep").records()
    assert sorted((r["family"], r["size"]) for r in records) == [
        ("hyena", "25K"), ("hyena", "50K"), ("mamba1", "25K"), ("mamba1", "50K")]
    for r in records:
        config = read_export_info(tmp_path / "sweep" / r["run_dir"] / "export").config
        template = get_dna_preset(f"{r['family']}-dna-cpu", vocab_size=10)
        expected = derive_model(template, r["family"], r["size"]).config
        assert (config.d_model, config.pattern) == (expected.d_model, expected.pattern)
        assert r["params_total"] == count_parameters(config).total and r["batch_size"] == 4
        assert r["steps"] == math.ceil(1000 / (4 * 64)) and r["tokens"] == r["steps"] * 4 * 64
        assert r["flops"] == pytest.approx(training_flops_per_token(config, 64, 4) * r["tokens"])
        assert r["eval_bits_per_base"] == pytest.approx(r["eval_loss"] / math.log(2))
        assert r["eval_tokens"] == 4 * 64  # max(4 windows, 256 tokens / 64)
    run_cli(monkeypatch, "sweep", "report", "size-cpu", f"sweep.dir={tmp_path / 'sweep'}")
    assert "eval_bits_per_base" in capsys.readouterr().out
    assert (tmp_path / "sweep" / "report" / "loss_vs_parameters.png").stat().st_size > 10_000


def test_context_sweep_keeps_tokens_a_step(genome: Path, tmp_path: Path, monkeypatch, capsys):
    run_cli(monkeypatch, "sweep", "context-cpu", *data_overrides(genome, tmp_path), "point.family=hyena",
            "seq_len=32,128", "sweep.tokens_per_batch=256", "sweep.tokens.value=1K", "sweep.eval.tokens=512")
    records = sorted(ResultsTable(tmp_path / "sweep").records(), key=lambda r: r["seq_len"])
    assert [(r["seq_len"], r["batch_size"]) for r in records] == [(32, 8), (128, 2)]
    assert {r["tokens"] for r in records} == {1024} and {r["params_total"] for r in records} == {
        count_parameters(get_dna_preset("hyena-dna-cpu", vocab_size=10)).total}
    for r in records:  # Hyena's filter is defined over the training window
        assert read_export_info(tmp_path / "sweep" / r["run_dir"] / "export").config.hyena.max_seqlen == r["seq_len"]
    run_cli(monkeypatch, "sweep", "report", "context-cpu", f"sweep.dir={tmp_path / 'sweep'}")
    out = capsys.readouterr().out
    assert "x = context length" in out and "2 points" in out
    assert (tmp_path / "sweep" / "report" / "loss_vs_seq_len.png").is_file()


@pytest.mark.parametrize("name", ["size-cpu", "context-cpu", "size", "context"])
def test_shipped_sweeps_compose(name: str):
    with initialize_config_dir(config_dir=str(CONFIG_ROOT / "dna"), version_base="1.3"):
        cfg = compose("sweep", overrides=[f"sweep={name}"], return_hydra_config=True)
    assert cfg.sweep.name == name and cfg.hydra.mode.name == "MULTIRUN"
    assert (cfg.trainer.accelerator == "cpu") == name.endswith("-cpu")
    for family, preset in cfg.sweep.families.items():
        get_dna_preset(str(preset))  # every template exists
    if name.startswith("context"):
        lengths = [int(v) for v in str(cfg.hydra.sweeper.params["seq_len"]).split(",")]
        assert max(lengths) <= int(cfg.sweep.tokens_per_batch)
        if name == "context":
            assert min(lengths) == 1024 and max(lengths) == 1 << 20
