"""``python -m domains.audio train``: prepare the data, train a sample-level model, export it.

Everything a run writes goes under ``run.dir`` (default ``runs/audio/<model>-<data>``): ``config.yaml``,
``checkpoints/`` (Lightning, ``last.ckpt`` for ``trainer.resume=last``), ``logs/`` and ``export/``
(``model.safetensors`` + ``config.json`` with the quantization and the data's global scale: what
``eval``, ``generate`` and ``metrics`` load). The loss is logged in nats per sample; the final report
gives bits per sample (nats / ln 2).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from core.checkpoint import atomic_write
from core.parallel import data_parallel_size
from core.training import OptimConfig, ResumableSampler, build_trainer, checkpoint_step, gather_model, resume_path
from domains.audio.data import PreparedAudio, Quantization, RandomCrops, Windows, prepare
from domains.audio.model import AudioLMModule, save_audio_export
from domains.audio.quantize import quantize


def container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def quantization_from(cfg: DictConfig) -> Quantization:
    q = Quantization(scheme=str(cfg.quantization.scheme), bits=int(cfg.quantization.bits))
    quantize(torch.zeros(1), q.scheme, q.bits)  # raises on an unknown scheme / bad bits, naming the choices
    return q


def data_loaders(cfg: DictConfig, data: PreparedAudio, quant: Quantization, start_step: int) -> tuple[DataLoader, DataLoader]:
    steps, batch = int(cfg.trainer.max_steps), int(cfg.batch_size)
    seq_len = int(cfg.seq_len)
    train_set = RandomCrops(data, "train", seq_len, num_samples=steps * batch * data_parallel_size(cfg.trainer),
                            seed=int(cfg.run.seed), quant=quant)
    workers = int(cfg.trainer.num_workers)
    train = DataLoader(train_set, batch_size=batch, sampler=ResumableSampler(len(train_set), start=start_step * batch),
                       num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    val = DataLoader(Windows(data, "val", seq_len, quant, max_windows_per_clip=cfg.get("val_windows_per_clip")),
                     batch_size=batch, num_workers=workers)
    return train, val


def train(cfg: DictConfig) -> dict[str, float]:
    """One training run; returns the final metrics (val bits per sample, steps, time)."""
    run_dir = Path(cfg.run.dir)
    L.seed_everything(int(cfg.run.seed), workers=True)
    if int(cfg.seq_len) < 2:
        raise ValueError(f"seq_len must be >= 2 samples, got {cfg.seq_len}")
    data = prepare(container(cfg.data))
    quant = quantization_from(cfg)
    spec = container(cfg.model)
    optim = OptimConfig(**{**container(cfg.optim), "max_steps": int(cfg.trainer.max_steps)})
    run_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write(run_dir / "config.yaml", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print(f"data: {data.describe()}")

    ckpt = resume_path(cfg.trainer.resume, run_dir)
    module = AudioLMModule(spec, quant.vocab_size, optim)
    n_params = sum(p.numel() for p in module.model.parameters())
    print(f"model: {spec['backbone']} {spec['config']['pattern']!r} d_model {spec['config']['d_model']}, "
          f"{n_params:,} parameters; context {cfg.seq_len} samples ({int(cfg.seq_len) / data.sample_rate:.3f} s)")
    train_loader, val_loader = data_loaders(cfg, data, quant, checkpoint_step(ckpt))
    trainer = build_trainer(cfg.trainer, run_dir)
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt)
    elapsed = time.perf_counter() - started
    val_loss = trainer.validate(module, dataloaders=val_loader, verbose=False)[0]["val/loss"]
    result = {"val_nats_per_sample": val_loss, "val_bits_per_sample": val_loss / math.log(2),
              "train_seconds": elapsed, "steps": trainer.global_step, "parameters": n_params}
    model = gather_model(trainer, module.model)  # every rank: under FSDP this gathers the shards
    if trainer.is_global_zero:
        audio = {"sample_rate": data.sample_rate, "scale": data.scale, "scheme": quant.scheme, "bits": quant.bits}
        export = save_audio_export(model, run_dir / "export", spec, audio,
                                   extra={"data": container(cfg.data), "seq_len": int(cfg.seq_len),
                                          "steps": trainer.global_step, "val_bits_per_sample": result["val_bits_per_sample"]})
        print(f"\nval {result['val_bits_per_sample']:.4f} bits/sample after {trainer.global_step} steps in {elapsed:.0f} s")
        print(f"export: {export}   checkpoints: {run_dir / 'checkpoints'}")
    return result
