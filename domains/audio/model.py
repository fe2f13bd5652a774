"""Audio models: a flat :class:`core.backbone.CausalLM` or the multi-scale
:class:`core.multiscale.MultiScaleLM` over quantized samples, their Lightning module and export.

A model spec (the ``model`` config group) is ``{"backbone": "flat" | "multiscale", "config": <ModelConfig
fields>, "pools": [...], "expand": e, "center_pattern": ...}``; the vocabulary is the quantization's
2^bits levels. An export folder holds ``model.safetensors`` and ``config.json``
(``{"format": "ssm-suite-audio", "spec": ..., "audio": {sample_rate, scale, scheme, bits}, ...}``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.accounting import training_flops_per_token
from core.backbone import CausalLM
from core.checkpoint import alias_keys, atomic_write
from core.config import ModelConfig
from core.multiscale import MultiScaleConfig, MultiScaleLM
from core.training import CausalLMModule, OptimConfig

EXPORT_FORMAT = "ssm-suite-audio"
BACKBONES = ("flat", "multiscale")


def model_config(spec: dict[str, Any], vocab_size: int) -> ModelConfig | MultiScaleConfig:
    """The config a spec describes, sized to ``vocab_size``."""
    backbone = spec.get("backbone")
    if backbone not in BACKBONES:
        raise ValueError(f"model.backbone must be one of {list(BACKBONES)}, got {backbone!r}")
    fields = {**dict(spec.get("config") or {}), "vocab_size": vocab_size, "pad_vocab_size_multiple": 1,
              "domain": "audio"}
    config = ModelConfig.from_dict(fields)
    if backbone == "flat":
        return config
    return MultiScaleConfig(model=config, pools=list(spec.get("pools", [4, 4])), expand=int(spec.get("expand", 2)),
                            center_pattern=spec.get("center_pattern"))


def build_model(spec: dict[str, Any], vocab_size: int) -> nn.Module:
    config = model_config(spec, vocab_size)
    return MultiScaleLM(config) if isinstance(config, MultiScaleConfig) else CausalLM(config)


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model can process (Hyena filters are defined up to ``hyena.max_seqlen``
    at their level), or None when unbounded (Mamba, S4D, attention, MLP)."""
    if isinstance(model, MultiScaleLM):
        limits = []
        for level, stage in enumerate(model.all_stages()):
            if any(b.char == "H" for b in stage.layers):
                limits.append(model.config.model.hyena.max_seqlen * math.prod(model.config.pools[:level]))
        return min(limits) if limits else None
    config = model.config
    return config.hyena.max_seqlen if "H" in config.pattern else None


class AudioLMModule(CausalLMModule):
    """:class:`core.training.CausalLMModule` (its training / validation steps, logging, AdamW + cosine)
    with the audio model (flat or multi-scale) in place of the CausalLM it builds."""

    def __init__(self, spec: dict[str, Any], vocab_size: int, optim: dict[str, Any] | OptimConfig) -> None:
        L.LightningModule.__init__(self)
        optim = asdict(optim) if isinstance(optim, OptimConfig) else dict(optim)
        optim["betas"] = tuple(optim.get("betas", (0.9, 0.95)))
        self.save_hyperparameters({"spec": spec, "vocab_size": vocab_size, "optim": optim})
        self.optim_config = OptimConfig(**optim)
        self.model = build_model(spec, vocab_size)
        self.model_config = self.model.config.model if isinstance(self.model, MultiScaleLM) else self.model.config
        self._step_started: float | None = None
        self._flops_cache: dict[int, float] = {}

    def _flops_per_token(self, seq_len: int) -> float:
        if seq_len not in self._flops_cache:
            if isinstance(self.model, MultiScaleLM):
                config = self.model.config
                # Level i runs on seq_len / P_i samples at its width: per input sample, 1 / P_i of its cost.
                total = 0.0
                for level in range(len(config.pools) + 1):
                    pool = math.prod(config.pools[:level])
                    level_cfg = config.level_config(level)
                    level_len = max(1, seq_len // pool)
                    total += training_flops_per_token(level_cfg, level_len) / pool
                self._flops_cache[seq_len] = total
            else:
                self._flops_cache[seq_len] = float(training_flops_per_token(self.model_config, seq_len))
        return self._flops_cache[seq_len]


def save_audio_export(model: nn.Module, folder: str | os.PathLike, spec: dict[str, Any], audio: dict[str, Any],
                      extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` (tied weights once) and ``config.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    aliases = alias_keys(state)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in aliases}
    meta = {"format": EXPORT_FORMAT, "format_version": 1, "spec": spec, "audio": audio, "extra": extra or {}}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return folder


def find_export(path: str | os.PathLike) -> Path:
    """An export folder, given it or a run folder (``<run>/export``)."""
    path = Path(path)
    for candidate in (path, path / "export"):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise FileNotFoundError(f"no audio export found at {path} (nor {path / 'export'}): expected config.json and "
                            "model.safetensors, which python -m domains.audio train writes under <run.dir>/export")


def load_audio_export(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, config.json's content) of an export folder or a run folder."""
    folder = find_export(path)
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{folder / 'config.json'} is not an audio export (format={meta.get('format')!r}); "
                         "language-model exports load with domains.lm")
    vocab = 2 ** int(meta["audio"]["bits"])
    model = build_model(meta["spec"], vocab)
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases = set(alias_keys(model.state_dict()))
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the model its config describes; missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.to(device).eval(), meta


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
