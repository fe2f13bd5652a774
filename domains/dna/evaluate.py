"""``python -m domains.dna eval checkpoint=...``: bits per base and perplexity, and perplexity against
context length.

The split comes from the data settings stored with the checkpoint (the same intervals as training,
so test bases were never trained on). The context curve scores *the same target bases* after each
context length (windows that end at fixed places; shorter contexts drop their front), so the curve
shows what more context buys; scoring different windows per length, as a plain sweep of the window
length does, mixes that with the difficulty of the windows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from core.checkpoint import load_export, read_export_info
from core.pattern import HYENA
from domains.dna.data import DNAData, LMEvalWindows
from core.training import mean_token_loss
from domains.dna.tokenizer import DNATokenizer, TokenizerMismatchError


def export_folder(checkpoint: str) -> Path:
    """A run folder's ``export/`` or the export folder itself; a clear error otherwise."""
    path = Path(str(checkpoint)).expanduser()
    if (path / "export" / "config.json").is_file():
        return path / "export"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"checkpoint={checkpoint}: no export found (expected {path / 'export' / 'config.json'} "
                            f"or {path / 'config.json'}); pass a pretrain run folder or its export/ folder")


def checkpoint_tokenizer(folder: Path, k: int | None) -> DNATokenizer:
    """The tokenizer stored with an export; with ``k`` given, checked against it."""
    info = read_export_info(folder)
    if info.tokenizer_path is None:
        raise TokenizerMismatchError(f"{folder} has no tokenizer.json; it was not written by `python -m domains.dna`")
    stored = DNATokenizer.from_dict(json.loads(info.tokenizer_path.read_text(encoding="utf-8")))
    if stored.vocab_size != info.config.vocab_size:
        raise TokenizerMismatchError(f"{folder}: tokenizer.json has {stored.vocab_size} tokens, the model "
                                     f"{info.config.vocab_size}; the folder mixes files of two runs")
    if k is not None:
        DNATokenizer(int(k)).check_matches(stored, str(folder))
    return stored


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_contexts(seq_len: int) -> list[int]:
    out, c = [], 16
    while c <= seq_len:
        out.append(c)
        c *= 4
    return out


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    folder = export_folder(cfg.checkpoint)
    info = read_export_info(folder)
    tokenizer = checkpoint_tokenizer(folder, cfg.tokenizer.k)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True) if cfg.data is not None else info.extra.get("data")
    if data_cfg is None:
        raise ValueError(f"{folder} records no data settings; pass data={{...}} (see configs/dna/data/)")
    data = DNAData(data_cfg)  # type: ignore[arg-type]
    tracks = data.settings.tracks
    device = pick_device(cfg.device)
    model = load_export(folder, device=device)
    seq_len = int(cfg.seq_len or info.extra.get("seq_len") or 1024)
    limit = model.config.hyena.max_seqlen if HYENA in model.config.pattern else None
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len={seq_len} exceeds this Hyena model's filter length {limit}; pass seq_len<={limit}")
    batch = int(cfg.batch_size)
    windows = LMEvalWindows(data, cfg.split, tokenizer, seq_len, int(cfg.max_windows), tracks=tracks)
    loss, tokens = mean_token_loss(model, DataLoader(windows, batch_size=batch), device)
    result: dict[str, Any] = {"loss": loss, "bits_per_base": tokenizer.bits_per_base(loss),
                              "ppl": math.exp(loss), "tokens": tokens, "seq_len": seq_len, "context": {}}
    print(f"{folder}: {cfg.split} split, {len(windows)} windows of {seq_len} tokens, {tokens:,} scored")
    result["unigram_bits_per_base"] = data.unigram_bits(cfg.split, tracks)
    print(f"loss {loss:.4f} nats/token, {result['bits_per_base']:.4f} bits/base, ppl {result['ppl']:.4f} "
          f"(base composition alone: {result['unigram_bits_per_base']:.4f} bits/base)")

    contexts = default_contexts(seq_len) if cfg.contexts is None else [int(c) for c in cfg.contexts]
    score_len = int(cfg.score_len)
    if limit is not None:  # Hyena's filter is defined over `limit` positions only
        dropped = [c for c in contexts if c + score_len > limit]
        contexts = [c for c in contexts if c + score_len <= limit]
        if dropped:
            print(f"contexts {dropped} skipped: with score_len {score_len} they exceed the Hyena filter length {limit}")
    if contexts:
        longest = max(contexts)
        print(f"context curve: the same {score_len} target tokens after each context")
        for c in sorted(contexts):
            ds = LMEvalWindows(data, cfg.split, tokenizer, score_len, int(cfg.max_windows), tracks=tracks,
                               context=c, max_context=longest)
            c_loss, _ = mean_token_loss(model, DataLoader(ds, batch_size=batch), device)
            result["context"][c] = {"loss": c_loss, "ppl": math.exp(c_loss),
                                    "bits_per_base": tokenizer.bits_per_base(c_loss)}
            print(f"  context {c:>8,} tokens: ppl {math.exp(c_loss):.4f}, {tokenizer.bits_per_base(c_loss):.4f} bits/base")
    return result
