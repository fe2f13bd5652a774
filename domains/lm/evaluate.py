"""``python -m domains.lm eval checkpoint=...``: perplexity and bits per byte on a split.

``checkpoint`` is a training run's folder (its ``export/`` is used) or an export folder. The split
comes from the corpus the model was trained on (its data settings are stored in the export), prepared
again or reused from the cache, so the test documents are the ones training never saw. Bits per byte
make models with different tokenizers comparable.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from core.checkpoint import load_export, read_export_info
from core.training import mean_token_loss
from domains.lm.data import PreparedData, prepare


def export_folder(checkpoint: str) -> Path:
    """A run folder's ``export/`` or the export folder itself; a clear error otherwise."""
    path = Path(checkpoint).expanduser()
    if (path / "export" / "config.json").is_file():
        return path / "export"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"checkpoint={checkpoint}: no export found (expected {path / 'export' / 'config.json'} or "
        f"{path / 'config.json'}). Pass a training run's folder (runs/lm/<name>) or its export/ folder."
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepared_data_of(folder: Path) -> PreparedData:
    info = read_export_info(folder)
    data_cfg = info.extra.get("data")
    if data_cfg is None:
        raise ValueError(f"{folder} records no training data settings (extra.data in config.json); "
                         "it was not written by `python -m domains.lm train`")
    return prepare(data_cfg)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    folder = export_folder(cfg.checkpoint)
    info = read_export_info(folder)
    data = prepared_data_of(folder)
    if info.tokenizer_path is not None:
        from domains.lm.tokenizer import LMTokenizer

        if LMTokenizer.load(info.tokenizer_path).sha256 != data.tokenizer.sha256:
            raise ValueError(f"the tokenizer of {folder} does not match the prepared data's "
                             f"({data.path}); the data cache was rebuilt with another tokenizer")
    device = pick_device(cfg.device)
    model = load_export(folder, device=device)
    seq_len = int(cfg.seq_len or info.extra.get("seq_len") or 1024)
    loader = DataLoader(data.eval_dataset(cfg.split, seq_len=seq_len), batch_size=int(cfg.batch_size))
    loss, tokens = mean_token_loss(model, loader, device)
    result = {"loss": loss, "ppl": math.exp(loss), "bits_per_byte": data.bits_per_byte(loss, cfg.split),
              "tokens": tokens}
    unigram = data.unigram_baseline(cfg.split)
    print(f"{folder}: {cfg.split} split, {tokens:,} tokens at seq_len {seq_len}")
    print(f"loss {loss:.4f} nats/token, ppl {result['ppl']:.2f}, {result['bits_per_byte']:.4f} bits/byte "
          f"(unigram ppl {unigram.perplexity:.1f}, {unigram.bits_per_byte:.4f} bits/byte)")
    return result
