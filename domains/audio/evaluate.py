"""``python -m domains.audio eval``: negative log-likelihood in bits per sample on a split, per context.

For every context length L of ``context_lengths`` the split's clips are cut into consecutive windows of L
samples, each scored from an empty state (its first input is the sample before it), and the NLL is
averaged over all predicted samples: how well the model does when it may look back at most L samples.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from domains.audio.data import Quantization, Windows, prepare
from domains.audio.model import load_audio_export, pick_device


@torch.no_grad()
def nll_bits(model: torch.nn.Module, dataset: Windows, batch_size: int, device: torch.device) -> tuple[float, int]:
    """(mean NLL in bits per sample, number of samples scored) of ``model`` over ``dataset``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    total, count = 0.0, 0
    for batch in loader:
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        logits = model(ids).logits
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                   reduction="sum")
        total += float(losses)
        count += int((labels != -100).sum())
    if count == 0:
        raise ValueError("no samples to score: the split is empty")
    return total / count / math.log(2), count


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    device = pick_device(str(cfg.device))
    model, meta = load_audio_export(cfg.checkpoint, device)
    data_cfg = dict(meta["extra"]["data"])
    if cfg.get("cache_dir"):
        data_cfg["cache_dir"] = cfg.cache_dir
    data = prepare(data_cfg)
    data.manifest["scale"] = meta["audio"]["scale"]  # the model's normalization, whatever the data's
    quant = Quantization(meta["audio"]["scheme"], int(meta["audio"]["bits"]))
    chosen = cfg.get("context_lengths")
    lengths = list(OmegaConf.to_container(chosen, resolve=True)) if chosen else [int(meta["extra"]["seq_len"])]
    results: dict[str, Any] = {"split": cfg.split, "bits_per_sample": {}}
    print(f"{cfg.split} split of {data.describe()}")
    print(f"{'context':>10} {'seconds':>8} {'bits/sample':>12} {'samples':>10} {'time':>7}")
    for length in lengths:
        started = time.perf_counter()
        windows = Windows(data, str(cfg.split), int(length), quant, max_windows_per_clip=cfg.get("max_windows_per_clip"))
        if cfg.get("max_windows"):
            windows.index = windows.index[: int(cfg.max_windows)]
        bits, count = nll_bits(model, windows, int(cfg.batch_size), device)
        results["bits_per_sample"][int(length)] = bits
        print(f"{length:>10} {int(length) / data.sample_rate:>8.3f} {bits:>12.4f} {count:>10} "
              f"{time.perf_counter() - started:>6.1f}s")
    return results
