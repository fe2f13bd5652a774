"""``python -m domains.lm sweep`` end to end (in-process Hydra multirun) on a tiny corpus: the shipped CPU
sweep at a still smaller size (2 families x 2 sizes, 8 steps), its records checked against the exports
(parameters, FLOPs recomputed from the exported config, the eval loss recomputed by hand), skipping
finished points on a re-run, a crash mid-point leaving no row, the report; the GPU sweep's config and
the SLURM launcher composing."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import domains.lm.evaluate as evaluate_module
import domains.lm.train as train_module
from core.accounting import count_parameters, training_flops_per_token
from core.checkpoint import load_export, read_export_info
from core.cli import CONFIG_ROOT
from core.presets import get_preset
from core.sweep import ResultsTable, derive_model
from domains.lm.__main__ import main
from domains.lm.data import prepare

def overrides(corpus: Path, tmp: Path, families: str, sizes: str) -> list[str]:
    return ["sweep=cpu", "data=files", f"data.paths=[{corpus}]", "data.vocab_size=300", "data.workers=1",
            f"data.cache_dir={tmp / 'cache'}", f"sweep.dir={tmp / 'sweep'}", f"point.family={families}",
            f"point.size={sizes}", "sweep.tokens.value=1K", "seq_len=32", "batch_size=4",
            "trainer.log_every_n_steps=1"]


def run_cli(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # run_command rewrites sys.argv for Hydra
    main(["domains.lm", *args])


@pytest.fixture(scope="module")
def swept(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        run_cli(mp, "sweep", *overrides(corpus, tmp, "mamba2,transformer++", "25K,100K"))
    return tmp


def test_every_point_writes_a_row_checked_against_its_export(swept: Path, corpus: Path):
    table = ResultsTable(swept / "sweep")
    records = table.records()
    assert sorted((r["family"], r["size"]) for r in records) == [
        ("mamba2", "100K"), ("mamba2", "25K"), ("transformer++", "100K"), ("transformer++", "25K")]
    with open(table.csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["key"] for r in rows} == {r["key"] for r in records}

    data = prepare({"paths": [str(corpus)], "vocab_size": 300, "workers": 1, "cache_dir": str(swept / "cache")})
    for r in records:
        run = table.folder / r["run_dir"]
        assert (table.folder / r["config"]).is_file() and not (run / "checkpoints").exists()
        info = read_export_info(run / "export")
        expected = derive_model(get_preset(f"{r['family']}-tiny", vocab_size=data.vocab_size), r["family"], r["size"])
        assert (info.config.d_model, info.config.pattern) == (expected.config.d_model, expected.config.pattern)
        model = load_export(run / "export")
        assert r["params_total"] == sum(p.numel() for p in model.parameters())
        assert r["params_non_embedding"] == count_parameters(info.config).non_embedding
        assert r["steps"] == math.ceil(1000 / (4 * 32)) and r["tokens"] == r["steps"] * 4 * 32
        assert r["flops"] == pytest.approx(training_flops_per_token(info.config, 32, 4) * r["tokens"])
        # The eval loss, recomputed by hand over the whole validation split.
        total, count = 0.0, 0
        dataset = data.eval_dataset("val", seq_len=32)
        with torch.no_grad():
            for i in range(len(dataset)):
                item = dataset[i]
                logits = model(item["input_ids"][None]).logits[0]
                mask = item["labels"] != -100
                total += float(torch.nn.functional.cross_entropy(logits[mask], item["labels"][mask], reduction="sum"))
                count += int(mask.sum())
        assert r["eval_loss"] == pytest.approx(total / count, rel=1e-5) and r["eval_tokens"] == count
        assert r["settings"]["seq_len"] == 32 and r["resolved_config"]["trainer"]["max_steps"] == r["steps"]
    assert len({r["settings_key"] for r in records}) == 1


def test_rerun_skips_and_a_crash_mid_point_leaves_no_row(swept: Path, corpus: Path, monkeypatch, capsys):
    table = ResultsTable(swept / "sweep")
    before = {r["key"]: r["finished_at"] for r in table.records()}
    csv_before = table.csv_path.read_text()

    def no_training(cfg):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr(train_module, "train", no_training)
    run_cli(monkeypatch, "sweep", *overrides(corpus, swept, "mamba2,transformer++", "25K,100K"))
    assert "skipped" in capsys.readouterr().out
    assert {r["key"]: r["finished_at"] for r in table.records()} == before
    monkeypatch.undo()

    # A new point that crashes after training, in its evaluation: no row, no partial file, the table as it was.
    def crash(cfg):
        raise RuntimeError("simulated crash in the evaluation")

    monkeypatch.setattr(evaluate_module, "evaluate", crash)
    with pytest.raises(SystemExit):
        run_cli(monkeypatch, "sweep", *overrides(corpus, swept, "mamba2", "50K"))
    monkeypatch.undo()
    assert len(table.records()) == 4 and sorted(p.suffix for p in table.records_dir.iterdir()) == [".json"] * 4
    assert table.csv_path.read_text() == csv_before
    crashed = [p for p in (table.folder / "points").iterdir() if p.name.startswith("50K-mamba2")]
    assert len(crashed) == 1 and (crashed[0] / "checkpoints" / "last.ckpt").is_file()

    # The re-run resumes the crashed point from its last checkpoint and adds its row.
    run_cli(monkeypatch, "sweep", *overrides(corpus, swept, "mamba2", "50K"))
    assert "resuming its last checkpoint" in capsys.readouterr().out
    records = table.records()
    assert len(records) == 5 and any(r["size"] == "50K" and r["family"] == "mamba2" for r in records)
    assert len(table.csv_path.read_text().splitlines()) == 6


def test_report_prints_fits_and_writes_plots(swept: Path, monkeypatch, capsys):
    run_cli(monkeypatch, "sweep", "report", "cpu", f"sweep.dir={swept / 'sweep'}")
    out = capsys.readouterr().out
    assert "Power law fits" in out and "| mamba2 |" in out and "not finished yet" in out
    for name in ("loss_vs_flops.png", "loss_vs_parameters.png", "table.md", "fits.json"):
        assert (swept / "sweep" / "report" / name).stat().st_size > 0


def lm_config(command: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_ROOT / "lm"), version_base="1.3"):
        return compose(command, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIG_ROOT / "lm" / "sweep").glob("*.yaml")))
def test_every_shipped_sweep_composes_and_derives(name: str):
    cfg = lm_config("sweep", [f"sweep={name}"])
    assert cfg.sweep.name == name and cfg.hydra.mode.name == "MULTIRUN"
    sizes = str(cfg.hydra.sweeper.params["point.size"]).split(",")
    for family in str(cfg.hydra.sweeper.params["point.family"]).split(","):
        template = get_preset(str(cfg.sweep.families[family]), vocab_size=int(cfg.data.vocab_size))
        params = [derive_model(template, family, size, count=str(cfg.sweep.count)).params for size in sizes]
        assert params == sorted(params), (family, params)


def test_the_gpu_sweep_compares_three_families_at_equal_tokens():
    gpu = lm_config("sweep", ["sweep=gpu-small"])
    assert gpu.trainer.accelerator == "gpu" and gpu.data.corpus == "python-stdlib"
    sizes = str(gpu.hydra.sweeper.params["point.size"]).split(",")
    families = str(gpu.hydra.sweeper.params["point.family"]).split(",")
    assert len(sizes) >= 4 and {"mamba2", "transformer++", "hybrid"} <= set(families)
    assert gpu.sweep.tokens.rule == "fixed"  # equal tokens
    for family in families:
        template = get_preset(str(gpu.sweep.families[family]), vocab_size=int(gpu.data.vocab_size))
        params = [derive_model(template, family, size).params for size in sizes]
        assert params == sorted(params) and 4e6 < params[0] and params[-1] < 70e6
    report_cfg = lm_config("sweep-report", ["sweep=gpu-small"])
    assert report_cfg.hydra.mode.name == "RUN" and report_cfg.sweep.dir == gpu.sweep.dir


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
    cfg = lm_config("sweep", ["sweep=gpu-small", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                              "hydra.launcher.gpus_per_node=1", "hydra.launcher.timeout_min=60"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.sweep.dir.endswith("gpu-small/multirun")


def test_unknown_family_names_the_choices(corpus: Path, tmp_path: Path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        run_cli(monkeypatch, "sweep", *overrides(corpus, tmp_path, "mamba3", "25K"))
    assert "mamba3" in capsys.readouterr().err
