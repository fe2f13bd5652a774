"""Continued training and context extension: ``trainer.init_from``, ``stages`` and ``loss_chunk_size`` of
``lm train``, at tiny size on CPU (experiment=context-extension-smoke: 64 -> 128 -> 256 tokens from
experiment=smoke's export), checked against the exports each stage leaves."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import domains.lm.train as train_module
from core.checkpoint import CheckpointError, load_export
from core.cli import CONFIG_ROOT
from core.parallel import checkpointed_blocks
from core.presets import get_preset
from domains.lm.tokenizer import LMTokenizer

def lm_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_ROOT / "lm"), version_base="1.3"):
        return compose("train", overrides=overrides)


def overrides(corpus: Path, cache: Path, run: Path, *extra: str, experiment: str = "smoke") -> list[str]:
    return [f"experiment={experiment}", "data=files", f"data.paths=[{corpus}]", "data.vocab_size=300",
            "data.workers=1", f"data.cache_dir={cache}", "run.name=test", f"run.dir={run}", "trainer.max_steps=2",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "samples.max_new_tokens=2",
            "samples.prompts=[The]", *extra]


def extension(corpus: Path, tmp: Path, *extra: str) -> list[str]:
    return overrides(corpus, tmp / "cache", tmp / "run", f"trainer.init_from={tmp / 'base' / 'export'}", *extra,
                     experiment="context-extension-smoke")


class Record(L.Callback):
    """Per fit: the model's weights when training starts, its class and loss chunk, each step's learning
    rate, batch shape and loss."""

    def __init__(self) -> None:
        self.fits: list[dict] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        self.fits.append({"start": state, "lrs": [], "shapes": [], "losses": [],
                          "model": type(pl_module.model).__name__, "checkpointed": checkpointed_blocks(pl_module),
                          "loss_chunk_size": pl_module.model.config.loss_chunk_size})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.fits[-1]["lrs"].append(trainer.optimizers[0].param_groups[0]["lr"])
        self.fits[-1]["shapes"].append(tuple(batch["input_ids"].shape))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.fits[-1]["losses"].append(float(outputs["loss"]))


BUILD_TRAINER = train_module.build_trainer


def run_train(monkeypatch, cfg, recorder: Record) -> dict:
    monkeypatch.setattr(train_module, "build_trainer",
                        lambda trainer_cfg, run_dir: BUILD_TRAINER(trainer_cfg, run_dir, extra_callbacks=[recorder]))
    return train_module.train(cfg)


@pytest.fixture(scope="module")
def staged(corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    """A base run (experiment=smoke, 64 tokens), then experiment=context-extension-smoke from its export."""
    tmp = tmp_path_factory.mktemp("staged")
    recorder = Record()
    monkeypatch = pytest.MonkeyPatch()
    try:
        run_train(monkeypatch, lm_config(overrides(corpus, tmp / "cache", tmp / "base")), recorder)
        result = run_train(monkeypatch, lm_config(extension(corpus, tmp)), recorder)
    finally:
        monkeypatch.undo()
    return tmp, result, recorder


def test_each_stage_starts_from_the_previous_export(staged):
    tmp, result, recorder = staged
    run = tmp / "run"
    names = ["s64", "s128", "s256"]
    assert list(result["stages"]) == names and len(recorder.fits) == 4  # the base run, then 3 stages
    exports = [tmp / "base" / "export"] + [run / name / "export" for name in names]
    for i, name in enumerate(names):
        assert (exports[i + 1] / "model.safetensors").is_file()
        assert (run / name / "checkpoints" / "last.ckpt").is_file()
        start = recorder.fits[i + 1]["start"]
        previous = load_file(str(exports[i] / "model.safetensors"))
        assert previous.keys() <= start.keys()
        for key, tensor in previous.items():
            torch.testing.assert_close(start[key], tensor, rtol=0, atol=0, msg=f"stage {name}: {key}")
        # ... and it trained from there: the stage's export differs from its start.
        final = load_file(str(exports[i + 1] / "model.safetensors"))
        assert any(not torch.equal(final[k], previous[k]) for k in previous)
    # The base run started from a fresh init (not from its own export).
    base = load_file(str(exports[0] / "model.safetensors"))
    assert any(not torch.equal(recorder.fits[0]["start"][k], base[k]) for k in base)
    # The final model is the last stage's export, and it loads.
    model = load_export(run / "s256" / "export")
    assert model.config.name == "hybrid-tiny"
    assert result["steps"] == 2 and result["export"] == str(run / "s256" / "export")


def test_each_stage_has_its_own_length_and_a_fresh_schedule(staged):
    _, _, recorder = staged
    stages = recorder.fits[1:]
    assert [fit["shapes"] for fit in stages] == [[(4, 64)] * 2, [(4, 128)] * 2, [(2, 256)] * 2]
    # Warmup restarts in every stage (2 warmup steps): step 0 runs at half the stage's lr.
    assert [fit["lrs"][0] for fit in stages] == pytest.approx([3e-3 / 2, 2e-3 / 2, 1e-3 / 2])
    # The experiment trains through the chunked loss (loss_chunk_size=32: the model config's field, the
    # model a plain CausalLM) with every block checkpointed (trainer.activation_checkpointing=true); the
    # base run does neither.
    assert [fit["model"] for fit in recorder.fits] == ["CausalLM"] * 4
    assert [fit["loss_chunk_size"] for fit in recorder.fits] == [None, 32, 32, 32]
    blocks = len(get_preset("hybrid-tiny").pattern)
    assert [fit["checkpointed"] for fit in recorder.fits] == [0] + [blocks] * 3


def test_chunked_loss_trains_like_the_plain_loss(corpus, tmp_path, monkeypatch):
    losses, weights = [], []
    for chunk in (0, 24):
        recorder = Record()
        cfg = lm_config(overrides(corpus, tmp_path / "cache", tmp_path / f"run{chunk}", f"loss_chunk_size={chunk}"))
        run_train(monkeypatch, cfg, recorder)
        losses.append(recorder.fits[0]["losses"])
        assert recorder.fits[0]["loss_chunk_size"] == (chunk or None)
        weights.append(load_file(str(tmp_path / f"run{chunk}" / "export" / "model.safetensors")))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # Same parameter names; the two runs trained (nearly) the same weights.
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-3, atol=1e-5, msg=key)
    # The export records the setting (its config.json is the model config); a 0 run's leaves it out.
    assert load_export(tmp_path / "run24" / "export").config.loss_chunk_size == 24
    assert load_export(tmp_path / "run0" / "export").config.loss_chunk_size is None
    cfg = lm_config(overrides(corpus, tmp_path / "cache", tmp_path / "bad", "loss_chunk_size=-1"))
    with pytest.raises(ValueError, match="loss_chunk_size must be >= 0"):
        run_train(monkeypatch, cfg, Record())
    cfg = lm_config(overrides(corpus, tmp_path / "cache", tmp_path / "bad", "loss_chunk_size=16",
                              "+model.overrides.loss_chunk_size=8"))
    with pytest.raises(ValueError, match="loss_chunk_size=16 and model.overrides.loss_chunk_size=8 disagree"):
        run_train(monkeypatch, cfg, Record())
    cfg = lm_config(overrides(corpus, tmp_path / "cache", tmp_path / "bad", "+optim.lrr=1"))
    with pytest.raises(ValueError, match=r"optim: unknown key\(s\) \['lrr'\]"):
        run_train(monkeypatch, cfg, Record())


def test_rerun_with_resume_skips_finished_stages(staged, corpus, monkeypatch):
    tmp, _, _ = staged
    recorder = Record()
    result = run_train(monkeypatch, lm_config(extension(corpus, tmp, "trainer.resume=last")), recorder)
    assert recorder.fits == [] and all(stage["skipped"] for stage in result["stages"].values())
    # A finished stage run with another config is not silently reused.
    cfg = lm_config(extension(corpus, tmp, "trainer.resume=last", "stages.1.optim.lr=5e-4"))
    with pytest.raises(ValueError, match="stage s128: .* another config"):
        run_train(monkeypatch, cfg, Record())


def test_the_gpu_recipe_config(tmp_path):
    cfg = lm_config(["experiment=context-extension-hybrid-130m", f"run.dir={tmp_path}"])
    stages = train_module.stage_configs(cfg)
    assert [(name, c.seq_len, c.batch_size) for name, c in stages] == [
        ("16k", 16384, 2), ("32k", 32768, 1), ("128k", 131072, 1)]
    for _, c in stages:
        assert c.model.preset == "hybrid-130m" and c.trainer.activation_checkpointing is True
        assert c.loss_chunk_size == 4096 and c.trainer.precision == "bf16-mixed"
        assert train_module.optim_config(c).lr == c.optim.lr  # every stage's optim keys are OptimConfig's
    assert [c.optim.lr for _, c in stages] == [3e-4, 2e-4, 1e-4]
    # python-docs' val split is shorter than 128K tokens: the last stage validates on 64K windows.
    assert [train_module.eval_seq_len(c) for _, c in stages] == [16384, 32768, 65536]
    assert stages[-1][1].run.dir == str(tmp_path / "128k")


def test_init_from_a_lightning_checkpoint(staged, corpus, tmp_path, monkeypatch):
    tmp, _, _ = staged
    ckpt = tmp / "run" / "s128" / "checkpoints" / "last.ckpt"  # a chunked-loss run's (32); this one's is not
    recorder = Record()
    cfg = lm_config(overrides(corpus, tmp / "cache", tmp_path / "run", f"trainer.init_from={ckpt}"))
    result = run_train(monkeypatch, cfg, recorder)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for key, tensor in recorder.fits[0]["start"].items():
        torch.testing.assert_close(tensor, saved[f"model.{key}"], rtol=0, atol=0, msg=key)
    assert result["steps"] == 2  # a fresh schedule: not the checkpoint's step count
    assert load_export(tmp_path / "run" / "export").config.pattern == get_preset("hybrid-tiny").pattern


def test_init_from_refuses_another_model(staged, corpus, tmp_path, monkeypatch):
    tmp, _, _ = staged
    export = tmp / "run" / "s64" / "export"
    cfg = lm_config(overrides(corpus, tmp / "cache", tmp_path / "run", "model=mamba2-tiny",
                              f"trainer.init_from={export}"))
    with pytest.raises(CheckpointError, match=r"different model [^\n]*\n(- .*\n)*- pattern: checkpoint 'M--\*M-', "
                                              r"this run 'MMMM'"):
        run_train(monkeypatch, cfg, Record())
    # Same preset, another width: named field by field.
    cfg = lm_config(overrides(corpus, tmp / "cache", tmp_path / "run", f"trainer.init_from={export}",
                              "+model.overrides.d_model=32"))
    with pytest.raises(CheckpointError, match="d_model: checkpoint 64, this run 32"):
        run_train(monkeypatch, cfg, Record())
    with pytest.raises(FileNotFoundError, match="no such export folder"):
        train_module.read_init_source(tmp_path / "nothing-here")


def test_init_from_refuses_another_tokenizer(staged):
    tmp, _, _ = staged
    export = tmp / "run" / "s64" / "export"
    model = load_export(export)
    other = LMTokenizer.train(["completely different text " * 50, "with other merges entirely " * 50],
                              vocab_size=300)
    with pytest.raises(CheckpointError, match="another tokenizer"):
        train_module.init_from_checkpoint(model, export, other)
    # Its own tokenizer passes, and the weights are the export's.
    own = LMTokenizer.load(export / "tokenizer.json")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    train_module.init_from_checkpoint(model, tmp / "run" / "s64", own)  # a run folder: its export
    weights = load_file(str(export / "model.safetensors"))
    for key, tensor in weights.items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_bad_stage_lists(corpus, tmp_path):
    base = overrides(corpus, tmp_path / "cache", tmp_path / "run")
    for stages, message in (("[{seq_len: 64}]", "needs a name"),
                            ("[{name: a, seq_len: 64}, {name: a, seq_len: 128}]", "used twice"),
                            ("[{name: a, seq_lenn: 64}]", "seq_lenn"),
                            ("[{name: a, run: {seed: 1}}]", "may not set")):
        with pytest.raises(ValueError, match=message):
            train_module.stage_configs(lm_config([*base, f"stages={stages}"]))
