"""The Lightning module every domain trains with: a causal sequence model, AdamW, warmup + cosine.

The module knows no domain: it takes batches ``{"input_ids": int64 [B, L], "labels": int64 [B, L]}``
(labels -100 are ignored) and a :class:`~core.config.ModelConfig`. Domains bring the data, the
vocabulary and the CLI; the Trainer (precision, strategy, loggers) is built by the caller.

Weight decay follows mamba_ssm and Megatron: none on norms, biases and the SSM parameters that carry
``_no_weight_decay`` (A_log, D, dt bias); the embedding's is a choice (``decay_embeddings``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

from core.accounting import training_flops_per_token
from core.backbone import CausalLM
from core.config import ModelConfig


@dataclass
class OptimConfig:
    """Optimizer and schedule. ``max_steps`` bounds the cosine; ``min_lr_ratio`` is its floor."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    max_steps: int = 1000
    min_lr_ratio: float = 0.1
    decay_embeddings: bool = False
    # Sequence-length warmup: grow the training length linearly from seq_len_warmup_start to the
    # full length over seq_len_warmup_steps (0 disables it).
    seq_len_warmup_steps: int = 0
    seq_len_warmup_start: int = 64
    # Peak dense matmul rate of one device, for MFU; None: guessed from the device name.
    peak_flops: float | None = None


def lr_lambda(step: int, config: OptimConfig) -> float:
    """Learning-rate multiplier: linear warmup, then cosine down to ``min_lr_ratio``."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def current_seq_len(step: int, full_len: int, config: OptimConfig) -> int:
    """The training length at ``step`` under sequence-length warmup (a multiple of 8 where possible)."""
    if config.seq_len_warmup_steps <= 0 or step >= config.seq_len_warmup_steps:
        return full_len
    start = min(config.seq_len_warmup_start, full_len)
    length = start + (full_len - start) * step / config.seq_len_warmup_steps
    return max(start, min(full_len, int(length) // 8 * 8 or int(length)))


def parameter_groups(model: nn.Module, config: OptimConfig) -> list[dict[str, Any]]:
    """Split parameters into decayed and not decayed (norms, biases, SSM parameters, embeddings)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = (
            getattr(param, "_no_weight_decay", False)
            or param.dim() < 2
            or name.endswith(".bias")
            or (id(param) in embeddings and not config.decay_embeddings)
        )
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@torch.no_grad()
def mean_token_loss(model: nn.Module, loader: Any, device: torch.device) -> tuple[float, int]:
    """Token-weighted mean cross-entropy (nats) over every labelled position (labels != -100) of
    ``loader``'s ``{"input_ids", "labels"}`` batches, and how many positions that was."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        labels = batch["labels"].to(device)
        n = int((labels != -100).sum())
        if n == 0:
            continue
        out = model(batch["input_ids"].to(device), labels=labels)
        total += float(out.ce_loss) * n
        count += n
    if count == 0:
        raise ValueError("nothing to score: every label of the split is ignored (-100)")
    return total / count, count


def guess_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 matmul peak of a known GPU (the datasheet figure), else None (no MFU logged)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
                       ("A10G", 125e12), ("4090", 165e12), ("3090", 71e12)):
        if key in name:
            return flops
    return None


class CausalLMModule(L.LightningModule):
    """Trains a :class:`~core.backbone.CausalLM` built from ``model_config``.

    Logged: ``train/loss`` (cross-entropy), ``train/aux_loss`` (MoE), ``train/lr``,
    ``train/tokens_per_s``, ``train/mfu`` (when the device's peak is known), ``train/seq_len``,
    ``val/loss`` and ``val/ppl``.
    """

    def __init__(self, model_config: dict[str, Any] | ModelConfig, optim: dict[str, Any] | OptimConfig) -> None:
        super().__init__()
        if isinstance(model_config, ModelConfig):
            model_config = model_config.to_dict()
        if isinstance(optim, OptimConfig):
            optim = asdict(optim)
        optim = dict(optim)
        optim["betas"] = tuple(optim.get("betas", (0.9, 0.95)))
        self.save_hyperparameters({"model_config": model_config, "optim": optim})
        self.model_config = ModelConfig.from_dict(model_config)
        self.optim_config = OptimConfig(**optim)
        self.model = CausalLM(self.model_config)
        self._step_started: float | None = None
        self._flops_cache: dict[int, float] = {}

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        return self.model(input_ids, **kwargs)

    def _flops_per_token(self, seq_len: int) -> float:
        if seq_len not in self._flops_cache:
            self._flops_cache[seq_len] = float(training_flops_per_token(self.model_config, seq_len))
        return self._flops_cache[seq_len]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids, labels = batch["input_ids"], batch["labels"]
        seq_len = current_seq_len(self.global_step, input_ids.shape[1], self.optim_config)
        input_ids, labels = input_ids[:, :seq_len], labels[:, :seq_len]
        out = self.model(input_ids, labels=labels)
        tokens = int((labels != -100).sum())
        self.log("train/loss", out.ce_loss, prog_bar=True)
        if out.aux_losses:
            self.log("train/aux_loss", sum(out.aux_losses.values()))
        self.log("train/seq_len", float(seq_len))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=True)
        now = time.perf_counter()
        if self._step_started is not None:
            elapsed = now - self._step_started
            world = self.trainer.world_size if self.trainer is not None else 1
            tokens_per_s = tokens * world / max(elapsed, 1e-9)
            self.log("train/tokens_per_s", tokens_per_s, prog_bar=True)
            peak = self.optim_config.peak_flops or guess_peak_flops(self.device)
            if peak:
                self.log("train/mfu", tokens_per_s * self._flops_per_token(seq_len) / (peak * world))
        self._step_started = now
        return out.loss

    def _eval_step(self, batch: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        out = self.model(batch["input_ids"], labels=batch["labels"])
        tokens = int((batch["labels"] != -100).sum())
        self.log(f"{prefix}/loss", out.ce_loss, prog_bar=True, sync_dist=True, batch_size=tokens)
        return out.ce_loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/ppl", torch.exp(loss.float()), prog_bar=True, sync_dist=True)
        self._step_started = None  # the validation pause is not training time

    def _uses_grad_scaler(self) -> bool:
        return self._trainer is not None and str(self.trainer.precision).startswith("16")

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip by global norm ourselves: Lightning's mixed-precision plugin refuses to clip for a fused
        optimizer (it expects one that unscales fp16 gradients itself), but under bf16 and fp32 there
        is no scaler and the gradients are already the true ones."""
        if not gradient_clip_val:
            return
        if self._uses_grad_scaler() or gradient_clip_algorithm not in (None, "norm"):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], gradient_clip_val)

    def configure_optimizers(self) -> dict[str, Any]:
        config = self.optim_config
        # fp16 needs the GradScaler's unscale before clipping, which a fused optimizer takes over.
        fused = self.device.type == "cuda" and not self._uses_grad_scaler()
        optimizer = torch.optim.AdamW(
            parameter_groups(self.model, config), lr=config.lr, betas=config.betas, eps=config.eps,
            fused=fused,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_lambda(step, config))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Indices ``0..num_samples-1`` in order, starting at ``start`` (for exact resume).

    ``len()`` stays ``num_samples`` so that Lightning's epoch length does not change on resume; the
    iteration yields only what is left. With several processes, rank ``r`` of ``w`` takes every w-th
    index. The datasets are indexable by sample number (windows seeded by index), so this reproduces
    the uninterrupted run's batches exactly.
    """

    def __init__(self, num_samples: int, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.start = start
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))

    def __iter__(self):  # type: ignore[override]
        first = self.start * self.world_size + self.rank
        return iter(range(first, self.num_samples, self.world_size))


def build_trainer(trainer_cfg: Any, run_dir: str | Any, extra_callbacks: list[Any] | None = None) -> L.Trainer:
    """A Lightning Trainer from the ``trainer`` config group, writing under ``run_dir``.

    Checkpoints: ``<run_dir>/checkpoints/last.ckpt`` (for ``trainer.resume=last``) and one each
    ``val_check_interval`` steps; logs: ``<run_dir>/logs`` (CSV and, when installed, TensorBoard).
    """
    from pathlib import Path

    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    run_dir = Path(run_dir)
    every = int(trainer_cfg.val_check_interval)
    callbacks: list[Any] = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step}", auto_insert_metric_name=False,
                        every_n_train_steps=every, save_last=True, save_top_k=-1),
    ]
    try:
        import rich  # noqa: F401

        callbacks.append(RichProgressBar(leave=True))
    except ImportError:
        callbacks.append(TQDMProgressBar())
    callbacks += extra_callbacks or []
    loggers: list[Any] = [CSVLogger(run_dir, name="logs", version="")]
    if trainer_cfg.get("tensorboard", True):
        try:
            loggers.append(TensorBoardLogger(run_dir, name="logs", version="", default_hp_metric=False))
        except ModuleNotFoundError:
            pass
    return L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        strategy=trainer_cfg.strategy,
        precision=trainer_cfg.precision,
        max_steps=int(trainer_cfg.max_steps),
        val_check_interval=every,
        check_val_every_n_epoch=None,
        limit_val_batches=trainer_cfg.limit_val_batches,
        gradient_clip_val=trainer_cfg.gradient_clip_val,
        log_every_n_steps=int(trainer_cfg.log_every_n_steps),
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=run_dir,
        num_sanity_val_steps=0,
        enable_model_summary=True,
    )


def resume_path(resume: str | None, run_dir: Any) -> str | None:
    """``None``, ``"last"`` (``<run_dir>/checkpoints/last.ckpt``, which must exist) or a .ckpt path."""
    from pathlib import Path

    if resume in (None, "", "none", "null"):
        return None
    path = Path(run_dir) / "checkpoints" / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        raise FileNotFoundError(
            f"trainer.resume={resume}: no checkpoint at {path}. Resume needs the same run.name "
            f"(run.dir) as the interrupted run, or a path to a .ckpt file."
        )
    return str(path)
