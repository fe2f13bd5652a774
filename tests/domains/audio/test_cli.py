"""The audio commands end to end on a few dozen synthesized digits: train -> export -> eval -> generate
-> metrics, the length limits of generation, and config errors before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from core.cli import CONFIG_ROOT
from domains.audio.data import prepare
from domains.audio.evaluate import evaluate
from domains.audio.metrics import metrics
from domains.audio.model import build_model, load_audio_export
from domains.audio.sample import check_length, sample
from domains.audio.train import train

from .conftest import TINY_DIGITS, needs_espeak


def audio_config(command: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_ROOT / "audio"), version_base="1.3"):
        return compose(command, overrides=overrides)


@pytest.fixture(scope="module")
def trained(audio_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("run")
    cfg = audio_config("train", ["experiment=smoke", f"data.cache_dir={audio_cache}", f"run.dir={run}",
                                 "trainer.max_steps=4", "seq_len=200"])
    return run, train(cfg)


@needs_espeak
def test_train_writes_an_export_that_reloads(trained):
    run, result = trained
    assert result["steps"] == 4 and 0 < result["val_bits_per_sample"] < 8.5
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    model, meta = load_audio_export(run)
    assert meta["audio"]["bits"] == 8 and meta["audio"]["scale"] > 0
    assert meta["spec"]["backbone"] == "multiscale" and meta["extra"]["seq_len"] == 200
    ids = torch.randint(0, 256, (1, 50))
    fresh = build_model(meta["spec"], 256)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.eval()(ids).logits, model(ids).logits)


@needs_espeak
def test_eval_reports_bits_per_sample_per_context(trained):
    run, result = trained
    out = evaluate(audio_config("eval", [f"checkpoint={run}", "context_lengths=[200,600]", "split=val",
                                         "max_windows=4", "batch_size=4"]))
    bits = out["bits_per_sample"]
    assert set(bits) == {200, 600} and all(0 < b < 8.5 for b in bits.values())
    # The training run's final validation saw the same windows: 2 batches (limit_val_batches) of 4.
    full = evaluate(audio_config("eval", [f"checkpoint={run}", "split=val", "batch_size=4", "max_windows=8"]))
    assert full["bits_per_sample"][200] == pytest.approx(result["val_bits_per_sample"], rel=1e-4)


@needs_espeak
def test_generate_unconditional_and_prompted_wavs(trained, tmp_path: Path):
    run, _ = trained
    paths = sample(audio_config("generate", [f"checkpoint={run}", f"out_dir={tmp_path / 'u'}", "num_samples=3",
                                             "batch_size=2", "seconds=0.004", "spectrogram=true"]))
    assert [p.name for p in paths] == ["sample_000.wav", "sample_001.wav", "sample_002.wav"]
    x, sr = sf.read(paths[0])
    assert sr == 16000 and x.shape == (64,)
    assert (tmp_path / "u" / "spectrogram.png").stat().st_size > 1000

    prompt = tmp_path / "prompt.wav"
    sf.write(prompt, 0.3 * np.sin(np.arange(8000) / 5.0), 8000)  # another rate: resampled
    paths = sample(audio_config("generate", [f"checkpoint={run}", f"out_dir={tmp_path / 'p'}", "num_samples=2",
                                             f"prompt={prompt}", "prompt_seconds=0.002", "seconds=0.002"]))
    x, _ = sf.read(paths[0])
    y, _ = sf.read(paths[1])
    assert x.shape == (64,) and np.allclose(x[:32], y[:32])  # the same prompt leads both samples

    with pytest.raises(ValueError, match="cache_max_seqlen=20"):
        sample(audio_config("generate", [f"checkpoint={run}", f"out_dir={tmp_path / 'x'}", "seconds=0.002",
                                         "cache_max_seqlen=20"]))


def test_generation_beyond_the_cache_of_a_hyena_model_is_refused():
    spec = {"backbone": "multiscale", "pools": [4, 2], "expand": 2, "center_pattern": "H",
            "config": {"d_model": 8, "pattern": "-", "hyena": {"max_seqlen": 16, "filter_order": 8}}}
    model = build_model(spec, 256)
    assert check_length(model, 1, 127, None) == 128  # 16 positions at the 8x-pooled center level
    with pytest.raises(ValueError, match="holds 128"):
        check_length(model, 1, 128, None)


@needs_espeak
def test_metrics_reference_row_and_a_folder(audio_cache: Path, tmp_path: Path):
    data_overrides = [*TINY_DIGITS, f"data.cache_dir={audio_cache}"]
    data = prepare(OmegaConf.to_container(audio_config("metrics", data_overrides).data, resolve=True))
    folder = tmp_path / "fake"
    for i, entry in enumerate(data.entries("test")[:6]):  # real test clips, at a third of the amplitude
        sf.write(folder.mkdir(exist_ok=True) or folder / f"{i}.wav", data.load(entry) / 3, 16000)
    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        sf.write(noise / f"{i}.wav", rng.normal(0, 0.1, 16000).clip(-1, 1), 16000)
    out = metrics(audio_config("metrics", [*data_overrides, f"samples=[{folder},{noise}]", "classifier.epochs=3"]))
    rows = out["rows"]
    assert list(rows) == ["test split (reference)", str(folder), str(noise)]
    for row in rows.values():
        assert row["FID"] >= -1e-6 and 1 - 1e-9 <= row["IS"] <= 10 and row["mIS"] >= 1 - 1e-9 and row["AM"] >= 0
    assert rows[str(noise)]["FID"] > rows["test split (reference)"]["FID"]
    assert 0 <= out["classifier_accuracy"] <= 1
    # Cached: the second call loads the classifier instead of training it (same accuracy).
    again = metrics(audio_config("metrics", [*data_overrides, "classifier.epochs=3"]))
    assert again["classifier_accuracy"] == out["classifier_accuracy"]


@pytest.mark.parametrize("override,message", [
    ("model=sashimi-mambaa", "Could not find 'model/sashimi-mambaa'"),
    ("trainer.max_stepz=3", "max_stepz"),
])
def test_config_typos_fail_before_any_work(override: str, message: str, tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "domains.audio", "train", override], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr + proc.stdout
    assert not (tmp_path / "data_cache").exists() and not (tmp_path / "runs").exists()


def test_every_model_config_builds():
    for path in sorted((CONFIG_ROOT / "audio" / "model").glob("*.yaml")):
        cfg = audio_config("train", [f"model={path.stem}"])
        model = build_model(OmegaConf.to_container(cfg.model, resolve=True), 256)
        assert sum(p.numel() for p in model.parameters()) > 0, path.stem
