"""``python -m domains.dna pretrain``: next-base prediction on a genome, then bits per base on val / test.

Everything a run writes goes under ``run.dir`` (default ``runs/dna/pretrain/<model>-<data>``):
``config.yaml`` (resolved config), ``checkpoints/`` (Lightning, ``last.ckpt`` for exact resume),
``logs/``, ``export/`` (``model.safetensors`` + ``config.json`` + ``tokenizer.json``; the data settings
and the tokenizer are stored in ``config.json``'s ``extra``, so ``eval`` and ``finetune`` find the same
splits and refuse another tokenizer).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from core.checkpoint import atomic_write, save_export
from core.config import ModelConfig
from core.dna_presets import get_dna_preset
from core.pattern import HYENA
from core.parallel import data_parallel_size
from core.training import (CausalLMModule, OptimConfig, ResumableSampler, build_trainer, checkpoint_step,
                           gather_model, mean_token_loss,
                           resume_path)
from domains.dna.data import DNAData, LMEvalWindows, LMWindows
from domains.dna.tokenizer import DNATokenizer


def model_config_from(cfg: DictConfig, tokenizer: DNATokenizer, max_seqlen: int) -> ModelConfig:
    """The model group's preset with its overrides, sized to the tokenizer; Hyena's filter length set to
    ``max_seqlen`` tokens (the longest window the model will read) unless the overrides fix it."""
    node = cfg.model.get("overrides")
    overrides: dict[str, Any] = OmegaConf.to_container(node, resolve=True) if node else {}  # type: ignore[assignment]
    config = get_dna_preset(cfg.model.preset, **overrides)
    config.vocab_size = tokenizer.vocab_size
    config.domain = "dna"
    config.name = str(cfg.model.preset)
    if HYENA in config.pattern and "max_seqlen" not in overrides.get("hyena", {}):
        config.hyena.max_seqlen = int(max_seqlen)
    return config


def optim_config(cfg: DictConfig) -> OptimConfig:
    return OptimConfig(**{**OmegaConf.to_container(cfg.optim, resolve=True),  # type: ignore[arg-type]
                          "max_steps": int(cfg.trainer.max_steps)})


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> None:
    text = OmegaConf.to_yaml(cfg, resolve=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", lambda tmp: tmp.write_text(text, encoding="utf-8"))


def pretrain(cfg: DictConfig) -> dict[str, float]:
    """Run one pretraining job; returns val / test loss, bits per base and perplexity (per token)."""
    run_dir = Path(cfg.run.dir)
    L.seed_everything(int(cfg.run.seed), workers=True)
    data_cfg = dict(OmegaConf.to_container(cfg.data, resolve=True))  # type: ignore[arg-type]
    data = DNAData(data_cfg)
    tokenizer = DNATokenizer(int(cfg.tokenizer.k))
    seq_len = int(cfg.seq_len)
    tracks = data.settings.tracks
    model_config = model_config_from(cfg, tokenizer, seq_len)
    optim = optim_config(cfg)
    ckpt = resume_path(cfg.trainer.resume, run_dir)

    steps, batch = int(cfg.trainer.max_steps), int(cfg.batch_size)
    train_set = LMWindows(data, "train", tokenizer, seq_len, num_samples=steps * batch * data_parallel_size(cfg.trainer),
                          seed=int(cfg.run.seed), rc_prob=float(cfg.rc_prob), tracks=tracks)
    val_set = LMEvalWindows(data, "val", tokenizer, seq_len, int(cfg.eval_windows), tracks=tracks)
    test_set = LMEvalWindows(data, "test", tokenizer, seq_len, int(cfg.eval_windows), tracks=tracks)
    save_resolved_config(cfg, run_dir)
    print(f"data: {data.describe()}")
    print(f"tokenizer: {tokenizer}; windows of {seq_len} tokens ({train_set.window:,} bases) from tracks "
          f"{tracks or 'all'}")

    module = CausalLMModule(model_config, optim)
    n_params = sum(p.numel() for p in module.model.parameters())
    print(f"model: {model_config.name} pattern {model_config.pattern!r} d_model {model_config.d_model}, "
          f"{n_params:,} parameters")
    workers = int(cfg.trainer.num_workers)
    train_loader = DataLoader(train_set, batch_size=batch, num_workers=workers, drop_last=True,
                              sampler=ResumableSampler(len(train_set), start=checkpoint_step(ckpt) * batch),
                              persistent_workers=workers > 0)
    val_loader = DataLoader(val_set, batch_size=batch, num_workers=workers)
    trainer = build_trainer(cfg.trainer, run_dir)
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt)
    elapsed = time.perf_counter() - started

    # The training device, not module.device: Lightning's teardown at the end of fit moves the module to
    # the CPU, where evaluating a GPU-sized model on millions of tokens takes minutes.
    device = trainer.strategy.root_device
    result: dict[str, float] = {"steps": trainer.global_step, "train_seconds": elapsed, "parameters": n_params}
    # Under FSDP the weights are shards: every rank takes part in the gather, rank 0 evaluates and exports.
    model = gather_model(trainer, module.model)
    if model is None:
        return result
    model = model.to(device)
    for split, dataset in (("val", val_set), ("test", test_set)):
        loss, tokens = mean_token_loss(model, DataLoader(dataset, batch_size=batch), device)
        result[f"{split}_loss"] = loss
        result[f"{split}_bits_per_base"] = tokenizer.bits_per_base(loss)
        result[f"{split}_ppl"] = math.exp(loss)
        result[f"{split}_tokens"] = tokens
    result["test_unigram_bits_per_base"] = data.unigram_bits("test", tracks)
    if trainer.is_global_zero:
        export = save_export(model, run_dir / "export", tokenizer_json=tokenizer.to_json(),
                             extra={"task": "pretrain", "data": data.settings.to_dict(),
                                    "tokenizer": tokenizer.to_dict(), "seq_len": seq_len,
                                    "steps": trainer.global_step,
                                    "test_bits_per_base": result["test_bits_per_base"]})
        print(f"\nval {result['val_bits_per_base']:.4f} bits/base (ppl {result['val_ppl']:.3f}), "
              f"test {result['test_bits_per_base']:.4f} bits/base (ppl {result['test_ppl']:.3f}) after "
              f"{trainer.global_step} steps in {elapsed:.0f} s; base composition alone: "
              f"{result['test_unigram_bits_per_base']:.4f} bits/base on test")
        print(f"export: {export}   checkpoints: {run_dir / 'checkpoints'}")
    return result
