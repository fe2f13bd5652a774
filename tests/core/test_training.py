"""The shared Lightning module: schedule, weight-decay groups, sequence-length warmup, the resumable
sampler, and gradient clipping with a fused optimizer under bf16 mixed precision."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from core.presets import get_preset
from core.training import (
    CausalLMModule,
    OptimConfig,
    ResumableSampler,
    current_seq_len,
    lr_lambda,
    parameter_groups,
)


def test_warmup_then_cosine_to_the_floor():
    config = OptimConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_lambda(0, config) == pytest.approx(0.1)
    assert lr_lambda(9, config) == pytest.approx(1.0)
    assert lr_lambda(10, config) == pytest.approx(1.0)
    assert lr_lambda(60, config) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(110, config) == pytest.approx(0.1)
    assert lr_lambda(500, config) == pytest.approx(0.1)


def test_sequence_length_warmup():
    config = OptimConfig(seq_len_warmup_steps=100, seq_len_warmup_start=64)
    assert current_seq_len(0, 1024, config) == 64
    assert 64 < current_seq_len(50, 1024, config) < 1024
    assert current_seq_len(100, 1024, config) == 1024
    assert current_seq_len(3, 1024, OptimConfig()) == 1024


def test_no_weight_decay_on_norms_biases_ssm_parameters_and_embeddings():
    module = CausalLMModule(get_preset("jamba-tiny"), OptimConfig())
    decay, no_decay = parameter_groups(module.model, OptimConfig())
    names = {id(p): n for n, p in module.model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert any(n.endswith("A_log") for n in no_decay_names)
    assert any(n.endswith(".D") for n in no_decay_names)
    assert any(n.endswith("dt_proj.bias") for n in no_decay_names)
    assert any("norm" in n for n in no_decay_names)
    assert "backbone.embedding.weight" in no_decay_names
    assert all(p.dim() >= 2 for p in decay["params"]) and not any("norm" in n for n in decay_names)
    decayed = parameter_groups(module.model, OptimConfig(decay_embeddings=True))[0]["params"]
    assert any(names[id(p)] == "backbone.embedding.weight" for p in decayed)


def test_resumable_sampler_continues_where_it_stopped():
    whole = list(ResumableSampler(20))
    assert whole == list(range(20))
    assert list(ResumableSampler(20, start=7)) == whole[7:]
    assert len(ResumableSampler(20, start=7)) == 20  # the epoch length Lightning sees stays the same
    ranks = [list(ResumableSampler(20, start=2, rank=r, world_size=2)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(4, 20))


class _Windows(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.arange(index, index + 17) % 200
        return {"input_ids": ids[:-1], "labels": ids[1:]}


class _FusedModule(CausalLMModule):
    def configure_optimizers(self):  # fused AdamW on CPU: what the module picks on a GPU
        config = self.optim_config
        return torch.optim.AdamW(parameter_groups(self.model, config), lr=config.lr, fused=True)


def test_clipping_with_a_fused_optimizer_under_bf16(tmp_path):
    module = _FusedModule(get_preset("mamba2-tiny"), OptimConfig(max_steps=2, warmup_steps=1))
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, gradient_clip_val=1e-3,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer.fit(module, DataLoader(_Windows(), batch_size=4))
    assert trainer.global_step == 2
    moved = [(p.detach() - b).norm() for p, b in zip(module.model.parameters(), before)]
    assert all(math.isfinite(float(m)) for m in moved) and max(float(m) for m in moved) > 0


def test_parameter_groups_see_through_activation_checkpointing():
    from core.parallel import apply_activation_checkpointing

    plain = CausalLMModule(get_preset("jamba-tiny"), OptimConfig()).model
    wrapped = CausalLMModule(get_preset("jamba-tiny"), OptimConfig()).model
    apply_activation_checkpointing(wrapped)
    sizes = [[p.numel() for p in g["params"]] for g in parameter_groups(plain, OptimConfig())]
    assert [[p.numel() for p in g["params"]] for g in parameter_groups(wrapped, OptimConfig())] == sizes


def test_build_trainer_applies_the_strategy_and_checkpointing(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy
    from omegaconf import OmegaConf

    from core.parallel import ActivationCheckpointing
    from core.training import build_trainer

    cfg = OmegaConf.create({"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "ddp",
                            "activation_checkpointing": 2, "precision": "32-true", "max_steps": 2,
                            "val_check_interval": 1, "limit_val_batches": 1, "gradient_clip_val": 1.0,
                            "log_every_n_steps": 1, "tensorboard": False})
    trainer = build_trainer(cfg, tmp_path)
    assert isinstance(trainer.strategy, DDPStrategy)
    (checkpointing,) = [c for c in trainer.callbacks if isinstance(c, ActivationCheckpointing)]
    assert (checkpointing.mode, checkpointing.every_n) == ("every_n", 2)
    cfg.strategy, cfg.activation_checkpointing = "auto", False
    trainer = build_trainer(cfg, tmp_path)
    assert not any(isinstance(c, ActivationCheckpointing) for c in trainer.callbacks)
    cfg.strategy = "horovod"
    with pytest.raises(ValueError, match="not one of"):
        build_trainer(cfg, tmp_path)


def test_resume_path_and_step_of_a_sharded_checkpoint_folder(tmp_path):
    from core.training import checkpoint_step, resume_path

    folder = tmp_path / "checkpoints" / "last.ckpt"
    folder.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="without meta.pt"):
        resume_path("last", tmp_path)
    torch.save({"global_step": 7}, folder / "meta.pt")
    assert resume_path("last", tmp_path) == str(folder)
    assert checkpoint_step(resume_path("last", tmp_path)) == 7 and checkpoint_step(None) == 0
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resume_path(str(tmp_path / "nope.ckpt"), tmp_path)


def test_max_time_stops_saves_last_and_resumes(tmp_path):
    import time

    from omegaconf import OmegaConf

    from core.training import build_trainer

    class SlowFirstStep(L.Callback):  # the first step outlasts the one-second limit
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 1:
                time.sleep(1.2)

    cfg = OmegaConf.create({"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto",
                            "activation_checkpointing": False, "precision": "32-true", "max_steps": 4,
                            "max_time": "00:00:00:01", "val_check_interval": 100, "limit_val_batches": 0,
                            "gradient_clip_val": 1.0, "log_every_n_steps": 1, "tensorboard": False})
    module = CausalLMModule(get_preset("mamba2-tiny"), OptimConfig(max_steps=4, warmup_steps=1))
    trainer = build_trainer(cfg, tmp_path, extra_callbacks=[SlowFirstStep()])
    trainer.fit(module, DataLoader(_Windows(), batch_size=4))
    stopped_at = trainer.global_step
    assert 1 <= stopped_at < 4
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file() and torch.load(last, weights_only=False)["global_step"] == stopped_at
    cfg.max_time = None
    trainer = build_trainer(cfg, tmp_path)
    trainer.fit(module, DataLoader(_Windows(), batch_size=4), ckpt_path=str(last))
    assert trainer.global_step == 4
    for bad in ("1h", "00:01:00", 90):
        cfg.max_time = bad
        with pytest.raises(ValueError, match="DD:HH:MM:SS"):
            build_trainer(cfg, tmp_path)
