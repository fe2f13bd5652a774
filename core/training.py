"""The Lightning module every domain trains with: a causal sequence model, AdamW, warmup + cosine.

The module knows no domain: it takes batches ``{"input_ids": int64 [B, L], "labels": int64 [B, L]}``
(labels -100 are ignored) and a :class:`~core.config.ModelConfig`. Domains bring the data, the
vocabulary and the CLI; :func:`build_trainer` makes the Trainer from the ``trainer`` config group,
including the multi-device strategy and activation checkpointing of :mod:`core.parallel`.

Several processes (DDP / FSDP): :class:`ResumableSampler` shards the training samples by rank by itself
(Lightning leaves it alone), :func:`gather_model` / :func:`full_state_dict` give rank 0 the unsharded
weights of an FSDP model for the export (every rank calls them), and :func:`checkpoint_step` reads the
step of a checkpoint file or of a sharded checkpoint folder.

Weight decay follows mamba_ssm and Megatron: none on norms, biases and the SSM parameters that carry
``_no_weight_decay`` (A_log, D, dt bias); the embedding's is a choice (``decay_embeddings``).
"""

from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

from core.accounting import training_flops_per_token
from core.backbone import CausalLM
from core.config import ModelConfig
from core.parallel import (
    SHAPE_ATTR,
    activation_checkpointing_callback,
    build_strategy,
    clean_parameter_name,
    compile_callback,
    is_fsdp_wrapped,
    original_ndim,
)


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
    """Split parameters into decayed and not decayed (norms, biases, SSM parameters, embeddings).

    Works on a plain model and on one wrapped by DDP, activation checkpointing or
    :class:`core.parallel.SuiteFSDPStrategy` (FSDP1 flattens parameters into 1-D shards; the strategy
    records their shapes first, and the Parameter objects with their ``_no_weight_decay`` marks survive).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    sharded = is_fsdp_wrapped(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if sharded and not hasattr(param, SHAPE_ATTR):
            raise RuntimeError(
                f"parameter_groups: {clean_parameter_name(name)} was flattened by FSDP without its shape "
                "recorded, so norms cannot be told from matrices; train with trainer.strategy=fsdp "
                "(core.parallel.SuiteFSDPStrategy), or call core.parallel.record_parameter_shapes before wrapping"
            )
        skip = (
            getattr(param, "_no_weight_decay", False)
            or original_ndim(param) < 2
            or clean_parameter_name(name).endswith(".bias")
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


class AdamWModule(L.LightningModule):
    """What every training module of the suite shares: AdamW (fused on CUDA unless an fp16 GradScaler
    runs) over :func:`parameter_groups` of ``self.model`` with the warmup + cosine schedule of
    ``self.optim_config``, and gradient clipping by global norm that works with the fused optimizer,
    logging ``train/grad_norm``."""

    def _uses_grad_scaler(self) -> bool:
        return self._trainer is not None and str(self.trainer.precision).startswith("16")

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip by global norm ourselves and log the norm before clipping (``train/grad_norm``).

        Lightning's mixed-precision plugin refuses to clip for a fused optimizer (it expects one that
        unscales fp16 gradients itself), but under bf16 and fp32 there is no scaler and the gradients
        are already the true ones. Under FSDP the gradients are shards: the root FSDP module computes the
        norm over all of them (a plain clip_grad_norm_ would use each rank's partial norm).
        """
        if not gradient_clip_val:
            return
        root = self.trainer.strategy.model if self._trainer is not None else None
        sharded = root is not None and is_fsdp_wrapped(root)
        if gradient_clip_algorithm not in (None, "norm") or (self._uses_grad_scaler() and not sharded):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if sharded:
            norm = root.clip_grad_norm_(gradient_clip_val)  # the scaler (fp16) has unscaled before this hook
        else:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        self.log("train/grad_norm", norm)

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


class CausalLMModule(AdamWModule):
    """Trains a :class:`~core.backbone.CausalLM` built from ``model_config``.

    Logged: ``train/loss`` (cross-entropy), ``train/aux_loss`` (MoE), ``train/lr``,
    ``train/tokens_per_s``, ``train/mfu`` (when the device's peak is known), ``train/seq_len``,
    ``train/grad_norm`` (before clipping, when clipping is on), ``val/loss`` and ``val/ppl``.
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


class ResumableSampler(torch.utils.data.DistributedSampler):
    """Indices ``0..num_samples-1`` in order, starting at ``start`` (for exact resume), sharded by rank.

    Rank ``r`` of ``w`` processes takes every w-th index from ``start * w + r``: ``start`` counts the
    samples one rank has consumed (``steps_done * per_device_batch``), so at equal global batch a run
    resumes on another number of devices exactly where it stopped. ``rank`` / ``world_size`` default to
    torch.distributed's when it is initialized (read when iterating: the sampler is built before
    Lightning starts the processes), else 0 / 1. It subclasses ``DistributedSampler`` so that Lightning
    does not shard it a second time (its DistributedSamplerWrapper would).

    ``len()`` stays the full shard (``num_samples / w``) so that Lightning's epoch length does not change
    on resume; the iteration yields only what is left, and only the first pass starts at ``start`` (a
    further epoch starts from the beginning). The datasets are indexable by sample number (windows
    seeded by index), so this reproduces the uninterrupted run's batches exactly.
    """

    def __init__(self, num_samples: int, start: int = 0, rank: int | None = None,
                 world_size: int | None = None) -> None:
        # DistributedSampler.__init__ needs a dataset and an initialized process group; nothing of it is
        # used, so it is not called. These attributes are the ones its users read.
        if num_samples < 0 or start < 0:
            raise ValueError(f"ResumableSampler: num_samples and start must be >= 0, got {num_samples}, {start}")
        self.num_samples = num_samples
        self.start = start
        self._rank = rank
        self._world_size = world_size
        self.shuffle = False
        self.drop_last = False
        self.seed = 0
        self.epoch = 0
        self._passes = 0

    @property
    def rank(self) -> int:  # type: ignore[override]
        if self._rank is not None:
            return self._rank
        dist = torch.distributed
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @rank.setter
    def rank(self, value: int) -> None:
        self._rank = value

    @property
    def world_size(self) -> int:
        if self._world_size is not None:
            return self._world_size
        dist = torch.distributed
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @world_size.setter
    def world_size(self, value: int) -> None:
        self._world_size = value

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        return self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))

    def __iter__(self):  # type: ignore[override]
        rank, world = self.rank, self.world_size
        if not 0 <= rank < world:
            raise ValueError(f"ResumableSampler: rank {rank} is outside world size {world}")
        start = self.start if self._passes == 0 else 0
        if self._passes == 1 and rank == 0:
            # The domains size their training sets for one pass of max_steps batches; a second pass means
            # the set was sized for fewer processes than there are.
            warnings.warn(
                f"ResumableSampler: a second pass over the {self.num_samples} training samples "
                f"({world} process(es)); if the set was meant to last the whole run, size it max_steps x "
                "batch_size x core.parallel.data_parallel_size(trainer config)", stacklevel=2)
        self._passes += 1
        return iter(range(start * world + rank, self.num_samples, world))


def parse_max_time(value: Any) -> str | None:
    """``trainer.max_time`` checked: None (no limit) or a ``"DD:HH:MM:SS"`` string, as Lightning takes it."""
    if value is None:
        return None
    text = str(value)
    if re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", text) is None:
        raise ValueError(f"trainer.max_time={value!r}: give the wall-clock limit as DD:HH:MM:SS, e.g. "
                         f"trainer.max_time='00:11:50:00' for 11 h 50 min (quoted on the command line), or null")
    return text


def build_trainer(trainer_cfg: Any, run_dir: str | Any, extra_callbacks: list[Any] | None = None) -> L.Trainer:
    """A Lightning Trainer from the ``trainer`` config group, writing under ``run_dir``.

    Checkpoints: ``<run_dir>/checkpoints/last.ckpt`` (for ``trainer.resume=last``; a folder of shards
    under ``strategy=fsdp``) and one each ``val_check_interval`` steps; logs: ``<run_dir>/logs`` (CSV
    and, when installed, TensorBoard). ``strategy`` (auto | ddp | fsdp), ``num_nodes`` and
    ``activation_checkpointing`` go through :func:`core.parallel.build_strategy` and
    :func:`core.parallel.activation_checkpointing_callback`; ``compile`` / ``compile_backend`` through
    :func:`core.parallel.compile_callback` (each block ``torch.compile``-d after checkpointing). ``max_time`` (optional, ``"DD:HH:MM:SS"``)
    stops training at that wall-clock time (checked after each step): ``last.ckpt`` is written as the run
    stops, so ``trainer.resume=last`` continues it, e.g. across the time limits of a cluster's jobs.
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
    checkpointing = activation_checkpointing_callback(trainer_cfg)
    if checkpointing is not None:
        callbacks.append(checkpointing)
    compiling = compile_callback(trainer_cfg)  # after checkpointing: it compiles the wrapped blocks
    if compiling is not None:
        callbacks.append(compiling)
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
        num_nodes=int(trainer_cfg.get("num_nodes", 1) or 1),
        strategy=build_strategy(trainer_cfg),
        precision=trainer_cfg.precision,
        max_steps=int(trainer_cfg.max_steps),
        max_time=parse_max_time(trainer_cfg.get("max_time")),
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


def is_sharded_checkpoint(path: str | Any) -> bool:
    """Whether ``path`` is a folder written by a sharded (FSDP) save: shards plus Lightning's meta.pt."""
    from pathlib import Path

    path = Path(path)
    return path.is_dir() and (path / "meta.pt").is_file()


def resume_path(resume: str | None, run_dir: Any) -> str | None:
    """``None``, ``"last"`` (``<run_dir>/checkpoints/last.ckpt``, which must exist) or a checkpoint path:
    a .ckpt file, or the folder of a sharded (``strategy=fsdp``) checkpoint."""
    from pathlib import Path

    if resume in (None, "", "none", "null"):
        return None
    path = Path(run_dir) / "checkpoints" / "last.ckpt" if resume == "last" else Path(resume)
    if not (path.is_file() or is_sharded_checkpoint(path)):
        what = "a folder without meta.pt (an incomplete sharded save?)" if path.is_dir() else "no checkpoint"
        raise FileNotFoundError(
            f"trainer.resume={resume}: {what} at {path}. Resume needs the same run.name "
            f"(run.dir) as the interrupted run, or a path to a .ckpt file or sharded checkpoint folder."
        )
    return str(path)


def checkpoint_step(path: str | None) -> int:
    """The global step stored in a checkpoint (0 for None): a .ckpt file or a sharded checkpoint folder
    (whose step is in its meta.pt). Domains start their :class:`ResumableSampler` from it."""
    from pathlib import Path

    if path is None:
        return 0
    file = Path(path) / "meta.pt" if is_sharded_checkpoint(path) else Path(path)
    # weights_only=False: Lightning's own checkpoint of this run (loop and callback state), not foreign data.
    return int(torch.load(file, map_location="cpu", weights_only=False)["global_step"])


def full_state_dict(trainer: L.Trainer, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict of ``model`` (a submodule of the trained LightningModule, keys relative to
    it, CPU tensors), for exports. Without FSDP: ``model.state_dict()`` on every rank. Under FSDP the
    weights are shards: every rank must call this (it all-gathers) and rank 0 gets the state dict, the
    other ranks None."""
    root = trainer.strategy.model
    if root is None or not is_fsdp_wrapped(root):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    prefix = next((clean_parameter_name(name) for name, m in root.named_modules() if m is model), None)
    if prefix is None:
        raise ValueError("full_state_dict: the model is not part of the trainer's model")
    # Offloading is what keeps a GPU from holding the whole model twice; on a CPU device it is pointless
    # and crashes torch 2.11's FSDP1 (a segmentation fault in the copy).
    offload = trainer.strategy.root_device.type != "cpu"
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=offload, rank0_only=True)):
        state = root.state_dict()
    if not trainer.is_global_zero:
        return None
    prefix = f"{prefix}." if prefix else ""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def gather_model(trainer: L.Trainer, model: nn.Module) -> nn.Module | None:
    """``model`` (a submodule of the trained LightningModule) with all its weights, for an export or
    samples after training.

    Without FSDP this is ``model`` itself on every rank. Under FSDP every rank must call this (see
    :func:`full_state_dict`); rank 0 gets a new, unsharded ``type(model)(model.config)`` on CPU holding
    the full weights (CausalLM, MultiScaleLM and their subclasses rebuild so), the other ranks None.
    """
    root = trainer.strategy.model
    if root is None or not is_fsdp_wrapped(root):
        return model
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"gather_model: {type(model).__name__} has no .config to rebuild it from; use "
                        "full_state_dict and build the model yourself")
    state = full_state_dict(trainer, model)
    if state is None:
        return None
    copy = type(model)(config)
    copy.load_state_dict(state)
    return copy
