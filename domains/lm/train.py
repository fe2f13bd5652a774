"""``python -m domains.lm train``: prepare the corpus, train a model, export it, print samples.

Everything a run writes goes under ``run.dir`` (default ``runs/lm/<model>-<data>``):
``config.yaml`` (the resolved config), ``checkpoints/`` (Lightning ``.ckpt`` for exact resume,
``last.ckpt`` included), ``logs/`` (CSV and TensorBoard), ``export/`` (``model.safetensors`` +
``config.json`` + ``tokenizer.json``, what ``eval`` and ``generate`` load).
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

from core.checkpoint import atomic_write, save_export
from core.config import ModelConfig
from core.generate import generate
from core.presets import get_preset
from core.training import CausalLMModule, OptimConfig, ResumableSampler, build_trainer, resume_path
from domains.lm.data import PreparedData, prepare


def model_config_from(cfg: DictConfig, vocab_size: int) -> ModelConfig:
    """The model group's preset with its overrides, sized to the tokenizer's vocabulary."""
    node = cfg.model.get("overrides")
    overrides: dict[str, Any] = OmegaConf.to_container(node, resolve=True) if node else {}  # type: ignore[assignment]
    config = get_preset(cfg.model.preset, **overrides)
    config.vocab_size = vocab_size
    config.domain = "lm"
    config.name = str(cfg.model.preset)
    if "H" in config.pattern and config.hyena.max_seqlen < int(cfg.seq_len):
        # Hyena's implicit filter is defined over max_seqlen positions (safari's l_max): it must cover
        # the training length, as in safari, where l_max is the dataset's sequence length.
        config.hyena.max_seqlen = int(cfg.seq_len)
    return config


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> None:
    text = OmegaConf.to_yaml(cfg, resolve=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", lambda tmp: tmp.write_text(text, encoding="utf-8"))


def data_loaders(cfg: DictConfig, data: PreparedData, start_step: int) -> tuple[DataLoader, DataLoader]:
    """Training windows (seeded by index, resumable at ``start_step``) and sequential validation windows."""
    steps = int(cfg.trainer.max_steps)
    batch = int(cfg.batch_size)
    world = int(cfg.trainer.devices) if isinstance(cfg.trainer.devices, int) else 1
    train_set = data.train_dataset(seq_len=int(cfg.seq_len), num_samples=steps * batch * world, seed=int(cfg.run.seed))
    sampler = ResumableSampler(len(train_set), start=start_step * batch)
    workers = int(cfg.trainer.num_workers)
    train = DataLoader(train_set, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                       persistent_workers=workers > 0)
    val = DataLoader(data.eval_dataset("val", seq_len=int(cfg.seq_len)), batch_size=batch, num_workers=workers)
    return train, val


def _checkpoint_step(path: str | None) -> int:
    if path is None:
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job; returns the final metrics (val loss / ppl / bpb and the unigram baseline)."""
    run_dir = Path(cfg.run.dir)
    L.seed_everything(int(cfg.run.seed), workers=True)
    data_cfg = dict(OmegaConf.to_container(cfg.data, resolve=True))  # type: ignore[arg-type]
    data_cfg["seq_len"] = int(cfg.seq_len)
    data = prepare(data_cfg)
    model_config = model_config_from(cfg, data.vocab_size)
    optim = OptimConfig(**{**OmegaConf.to_container(cfg.optim, resolve=True), "max_steps": int(cfg.trainer.max_steps)})  # type: ignore[arg-type]
    save_resolved_config(cfg, run_dir)

    unigram = data.unigram_baseline("val")
    print(f"data: {data.describe()}")
    print(f"unigram baseline on val: ppl {unigram.perplexity:.1f} ({unigram.bits_per_byte:.3f} bits/byte)")

    ckpt = resume_path(cfg.trainer.resume, run_dir)
    module = CausalLMModule(model_config, optim)
    n_params = sum(p.numel() for p in module.model.parameters())
    print(f"model: {model_config.name} pattern {model_config.pattern!r} d_model {model_config.d_model}, "
          f"{n_params:,} parameters")
    train_loader, val_loader = data_loaders(cfg, data, _checkpoint_step(ckpt))
    trainer = build_trainer(cfg.trainer, run_dir)
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt)
    elapsed = time.perf_counter() - started

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    val_loss = trainer.validate(module, dataloaders=val_loader, verbose=False)[0]["val/loss"]
    result = {
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "val_bits_per_byte": data.bits_per_byte(val_loss, "val"),
        "unigram_ppl": unigram.perplexity,
        "train_seconds": elapsed,
        "tokens_per_s": metrics.get("train/tokens_per_s", float("nan")),
        "steps": trainer.global_step,
    }
    if trainer.is_global_zero:
        export_dir = save_export(module.model, run_dir / "export", tokenizer_json=data.tokenizer.hf.to_str(),
                                 extra={"data": data_cfg, "seq_len": int(cfg.seq_len), "steps": trainer.global_step,
                                        "val_loss": val_loss})
        print(f"\nval ppl {result['val_ppl']:.2f} (unigram {unigram.perplexity:.1f}), "
              f"{result['val_bits_per_byte']:.3f} bits/byte, after {trainer.global_step} steps in {elapsed:.0f} s")
        print(f"export: {export_dir}   checkpoints: {run_dir / 'checkpoints'}")
        print_samples(module.model, data, cfg.samples)
    return result


def print_samples(model: torch.nn.Module, data: PreparedData, samples: DictConfig) -> None:
    prompts = list(samples.prompts)
    if not prompts:
        return
    ids = [data.tokenizer.encode(p) or [data.eot_id] for p in prompts]
    out = generate(model, ids, max_new_tokens=int(samples.max_new_tokens), temperature=float(samples.temperature),
                   top_p=float(samples.top_p), seed=0, stop_tokens=[data.eot_id], pad_token_id=data.pad_id)
    for prompt, continuation in zip(prompts, out.sequences()):
        text = data.tokenizer.decode([t for t in continuation if t != data.eot_id])
        print(f"\n--- sample ---\n{prompt}{text}")
