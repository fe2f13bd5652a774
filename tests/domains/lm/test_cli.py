"""The language domain's commands end to end on a small synthetic corpus: train, exact resume, eval,
generate, and the errors a user meets first (config typos, unknown presets, missing checkpoints)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir

import domains.lm.train as train_module
from core.cli import CONFIG_ROOT
from domains.lm.evaluate import evaluate
from domains.lm.sample import sample

def lm_config(command: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_ROOT / "lm"), version_base="1.3"):
        return compose(command, overrides=overrides)


def train_overrides(corpus: Path, tmp: Path, *extra: str) -> list[str]:
    return ["experiment=smoke", "data=files", f"data.paths=[{corpus}]", "data.vocab_size=300",
            "data.workers=1", f"data.cache_dir={tmp / 'cache'}", "run.name=test", f"run.dir={tmp / 'run'}",
            "trainer.log_every_n_steps=1", *extra]


class RecordLosses(L.Callback):
    """Keeps each step's training loss; optionally stops the run by raising after ``stop_at`` steps."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            raise RuntimeError("simulated interruption")


BUILD_TRAINER = train_module.build_trainer


def run_train(monkeypatch, cfg, recorder: RecordLosses) -> dict:
    monkeypatch.setattr(train_module, "build_trainer",
                        lambda trainer_cfg, run_dir: BUILD_TRAINER(trainer_cfg, run_dir, extra_callbacks=[recorder]))
    return train_module.train(cfg)


def test_train_eval_generate(corpus: Path, tmp_path: Path, monkeypatch, capsys):
    recorder = RecordLosses()
    result = run_train(monkeypatch, lm_config("train", train_overrides(corpus, tmp_path)), recorder)
    run = tmp_path / "run"
    assert sorted(recorder.losses) == list(range(1, 7))
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (run / "export" / name).is_file()
    assert result["steps"] == 6 and result["val_ppl"] > 1
    resolved = (run / "config.yaml").read_text()
    assert "hybrid-tiny" in resolved and "${" not in resolved

    scores = evaluate(lm_config("eval", [f"checkpoint={run}", "split=test", "batch_size=2"]))
    assert scores["tokens"] > 0 and scores["ppl"] > 1 and scores["bits_per_byte"] > 0

    texts = sample(lm_config("generate", [f"checkpoint={run}", "prompt=The model", "max_new_tokens=5",
                                          "stream=true", "stop_at_eot=false"]))
    assert len(texts) == 1 and len(texts[0]) > 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The scan\nA long sequence of tokens and\n", encoding="utf-8")
    texts = sample(lm_config("generate", [f"checkpoint={run}", f"prompts_file={prompts}", "max_new_tokens=4"]))
    assert len(texts) == 2
    assert "tok/s" in capsys.readouterr().err
    texts = sample(lm_config("generate", [f"checkpoint={run}", "prompt=The model", "max_new_tokens=3",
                                          "stream=false", "ssm_state_dtype=bfloat16"]))
    assert len(texts) == 1
    with pytest.raises(ValueError, match="ssm_state_dtype='int8'"):
        sample(lm_config("generate", [f"checkpoint={run}", "prompt=x", "ssm_state_dtype=int8"]))


def test_resume_reproduces_the_uninterrupted_run(corpus: Path, tmp_path: Path, monkeypatch):
    whole = RecordLosses()
    run_train(monkeypatch, lm_config("train", train_overrides(corpus, tmp_path / "a")), whole)

    interrupted = RecordLosses(stop_at=4)  # the last checkpoint is step 3's
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run_train(monkeypatch, lm_config("train", train_overrides(corpus, tmp_path / "b")), interrupted)
    resumed = RecordLosses()
    run_train(monkeypatch, lm_config("train", train_overrides(corpus, tmp_path / "b", "trainer.resume=last")),
              resumed)
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.losses[step] == pytest.approx(whole.losses[step], rel=1e-6, abs=1e-7)
    assert interrupted.losses[1] == pytest.approx(whole.losses[1], rel=1e-6)


def test_compiled_blocks_train_like_eager_ones(corpus: Path, tmp_path: Path, monkeypatch):
    # trainer.compile with aot_eager (dynamo + AOT autograd, no code generation: fast on CPU), together with
    # activation checkpointing: the same losses step by step, and the run exports and samples as usual.
    from core.parallel import COMPILED_ATTR

    class RecordCompiled(RecordLosses):
        def on_train_start(self, trainer, pl_module) -> None:
            self.compiled = [type(m).__name__ for m in pl_module.modules()
                             if getattr(m, COMPILED_ATTR, None) is not None]

    eager, compiled = RecordCompiled(), RecordCompiled()
    run_train(monkeypatch, lm_config("train", train_overrides(corpus, tmp_path / "a",
                                                              "trainer.activation_checkpointing=true")), eager)
    run_train(monkeypatch, lm_config("train", train_overrides(
        corpus, tmp_path / "b", "trainer.activation_checkpointing=true", "trainer.compile=true",
        "trainer.compile_backend=aot_eager")), compiled)
    assert eager.compiled == [] and compiled.compiled == ["CheckpointWrapper"] * 6  # hybrid-tiny's 6 blocks
    assert sorted(compiled.losses) == sorted(eager.losses) == list(range(1, 7))
    for step, loss in eager.losses.items():
        assert compiled.losses[step] == pytest.approx(loss, rel=1e-5)
    assert (tmp_path / "b" / "run" / "export" / "model.safetensors").is_file()


def test_resume_without_checkpoint_names_the_fix(corpus: Path, tmp_path: Path):
    cfg = lm_config("train", train_overrides(corpus, tmp_path, "trainer.resume=last"))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train_module.train(cfg)


def test_unknown_preset_and_too_small_corpus(corpus: Path, tmp_path: Path):
    cfg = lm_config("train", train_overrides(corpus, tmp_path, "model.preset=hybrid-tinny"))
    with pytest.raises(KeyError, match="hybrid-tiny"):
        train_module.train(cfg)
    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):
        (small / f"d{i}.txt").write_text("tiny text here.\n", encoding="utf-8")
    cfg = lm_config("train", train_overrides(small, tmp_path, "seq_len=512"))
    with pytest.raises(ValueError, match="seq_len"):
        train_module.train(cfg)


def test_eval_of_a_missing_checkpoint(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no export found"):
        evaluate(lm_config("eval", [f"checkpoint={tmp_path / 'nothing'}"]))


def test_every_preset_has_a_model_config():
    from core.presets import PRESETS

    names = {p.stem for p in (CONFIG_ROOT / "lm" / "model").glob("*.yaml")}
    assert set(PRESETS) <= names


@pytest.mark.parametrize("override,message", [
    ("model=hybrid-tinny", "Could not find 'model/hybrid-tinny'"),
    ("trainer.max_stepz=3", "max_stepz"),
])
def test_config_typos_fail_before_any_work(override: str, message: str, tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "domains.lm", "train", override], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert not (tmp_path / "data_cache").exists() and not (tmp_path / "runs").exists()


def test_cli_usage_and_unknown_command():
    proc = subprocess.run([sys.executable, "-m", "domains.lm", "trian"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown command 'trian'" in proc.stderr and "train" in proc.stderr


def test_hyena_filter_covers_the_training_length(corpus: Path, tmp_path: Path):
    cfg = lm_config("train", train_overrides(corpus, tmp_path, "model=hyena-tiny", "seq_len=300"))
    config = train_module.model_config_from(cfg, vocab_size=300)
    assert config.hyena.max_seqlen == 300 and config.vocab_size == 300 and config.domain == "lm"
