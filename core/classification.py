"""Sequence classification: a backbone, a pooling and a linear head, and its Lightning module.

    input_ids int64 [B, L] -> features [B, L, d_model] -> pooled [B, d_model] -> logits float32 [B, C]

``mode`` picks how the backbone reads the sequence:

- ``causal``: the backbone as pretrained (left to right); ``pooling="last"`` is then the natural
  summary (the last position has seen everything).
- ``bidirectional``: :class:`core.bidirectional.BidirectionalBackbone` (a second backbone reads the
  reversed sequence; ``share_directions`` uses one set of weights for both).
- ``rc``: :class:`core.bidirectional.RCEquivariantBackbone` (DNA): one backbone reads the sequence and its
  reverse complement; the logits are RC-invariant exactly, for both poolings.

Pretrained weights come from a :class:`~core.backbone.CausalLM` (``load_backbone``); the backward
backbone of the bidirectional mode starts from the same weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.backbone import Backbone
from core.bidirectional import BidirectionalBackbone, RCEquivariantBackbone, check_rc_map
from core.config import ModelConfig
from core.training import AdamWModule, OptimConfig

MODES = ("causal", "bidirectional", "rc")
POOLINGS = ("mean", "last")


@dataclass
class ClassifierConfig:
    n_classes: int
    mode: str = "causal"
    pooling: str = "mean"
    share_directions: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.n_classes, int) or self.n_classes < 2:
            raise ValueError(f"n_classes must be an int >= 2, got {self.n_classes!r}")
        if self.mode not in MODES:
            raise ValueError(f"classifier mode {self.mode!r} unknown; choose one of {MODES}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} unknown; choose one of {POOLINGS}")


@dataclass
class ClassifierOutput:
    """logits float32 [B, C]; loss: mean cross-entropy (with labels), plus MoE auxiliary losses if any."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class SequenceClassifier(nn.Module):
    """Backbone (per ``mode``) + pooling + ``head`` (Linear d_model -> n_classes).

    ``rc_map`` (int64 [vocab_size], each token's complement) is required by ``mode="rc"``.
    """

    def __init__(self, model_config: ModelConfig, head: ClassifierConfig, rc_map: torch.Tensor | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config, self.head_config = model_config, head
        if head.mode == "rc":
            if rc_map is None:
                raise ValueError("mode='rc' needs the tokenizer's rc_map (each token's complement)")
            self.encoder: nn.Module = RCEquivariantBackbone(model_config, rc_map, device=device, dtype=dtype)
        elif head.mode == "bidirectional":
            self.encoder = BidirectionalBackbone(model_config, share=head.share_directions, device=device, dtype=dtype)
        else:
            self.encoder = _CausalEncoder(model_config, device=device, dtype=dtype)
        self.dropout = nn.Dropout(head.dropout)
        self.head = nn.Linear(model_config.d_model, head.n_classes, device=device, dtype=dtype)
        nn.init.normal_(self.head.weight, std=model_config.initializer_range)
        nn.init.zeros_(self.head.bias)

    def backbones(self) -> list[Backbone]:
        return [m for m in self.encoder.modules() if isinstance(m, Backbone)]

    def load_backbone(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy a CausalLM's ``backbone.*`` weights into every backbone (strict: shapes must match)."""
        sub = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        if not sub:
            raise ValueError("the pretrained state dict has no backbone.* weights (not a CausalLM's)")
        for backbone in self.backbones():
            backbone.load_state_dict(sub, strict=True)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> ClassifierOutput:
        """input_ids int64 [B, L] (no padding), labels int64 [B] -> :class:`ClassifierOutput`."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got {tuple(input_ids.shape)}")
        features, summary, aux = self.encoder(input_ids)
        pooled = features.mean(dim=1) if self.head_config.pooling == "mean" else summary
        pooled = self.dropout(pooled.to(self.head.weight.dtype))
        logits = self.head(pooled).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels)
            if aux:  # MoE blocks' load-balancing / z losses, already weighted
                loss = loss + sum(aux.values())
        return ClassifierOutput(logits=logits, loss=loss)


class _CausalEncoder(nn.Module):
    def __init__(self, config: ModelConfig, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.backbone = Backbone(config, device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        h, aux = self.backbone(input_ids)
        return h, h[:, -1], aux


class ClassifierModule(AdamWModule):
    """Trains a :class:`SequenceClassifier` on ``{"input_ids": [B, L], "labels": [B]}`` batches.

    Logged: ``train/loss``, ``train/acc``, ``train/lr``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.
    """

    def __init__(self, model_config: dict[str, Any] | ModelConfig, head: dict[str, Any] | ClassifierConfig,
                 optim: dict[str, Any] | OptimConfig, rc_map: list[int] | None = None) -> None:
        super().__init__()
        model_config = model_config.to_dict() if isinstance(model_config, ModelConfig) else model_config
        head = asdict(head) if isinstance(head, ClassifierConfig) else dict(head)
        optim = asdict(optim) if isinstance(optim, OptimConfig) else dict(optim)
        optim["betas"] = tuple(optim.get("betas", (0.9, 0.95)))
        rc_list = None if rc_map is None else [int(i) for i in rc_map]
        self.save_hyperparameters({"model_config": model_config, "head": head, "optim": optim, "rc_map": rc_list})
        self.optim_config = OptimConfig(**optim)
        rc = None if rc_list is None else check_rc_map(torch.tensor(rc_list), model_config["vocab_size"])
        self.model = SequenceClassifier(ModelConfig.from_dict(model_config), ClassifierConfig(**head), rc_map=rc)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits

    def _step(self, batch: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        out = self.model(batch["input_ids"], labels=batch["labels"])
        acc = (out.logits.argmax(-1) == batch["labels"]).float().mean()
        n = batch["labels"].shape[0]
        sync = prefix != "train"
        self.log(f"{prefix}/loss", out.loss, prog_bar=True, batch_size=n, sync_dist=sync)
        self.log(f"{prefix}/acc", acc, prog_bar=True, batch_size=n, sync_dist=sync)
        return out.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")
