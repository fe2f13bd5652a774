"""``python -m domains.audio metrics``: SaShiMi's SC09 sample-quality metrics from a digit classifier.

A small CNN over log-mel spectrograms is trained once on the training digits (cached next to the
prepared data, keyed by its settings). Its penultimate activations f(x) and class posteriors p(y|x)
score a set of one-second waveforms X:

- FID:  Frechet distance between Gaussians fitted to f(X) and to f(training clips)     (lower is better)
- IS:   exp E_x KL(p(y|x) || p(y)), p(y) the mean posterior over X                    (higher; max 10)
- mIS:  modified IS, exp E_{x,x'} KL(p(y|x) || p(y|x')) over pairs of X                (higher)
- AM:   KL(p_train(y) || p(y)) + E_x H(p(y|x)), p_train the mean posterior on training (lower)

The table has the classifier's accuracy on the test split (the ceiling of what it can tell), a
reference row computed on the test split itself (what real, unseen-voice digits score), and one row per
folder of generated WAV files (``samples=[dir, ...]``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from core.checkpoint import atomic_write
from domains.audio.data import DIGITS, AudioError, PreparedAudio, find_audio, prepare, read_audio


class DigitClassifier(nn.Module):
    """log-mel [40 x frames] -> 3 conv blocks -> global average -> features [4 width] -> 10 logits."""

    def __init__(self, sample_rate: int, width: int = 32, n_classes: int = len(DIGITS)) -> None:
        super().__init__()
        import torchaudio

        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=512, hop_length=160, n_mels=40)

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.net = nn.Sequential(*block(1, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2),
                                 *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x float [N, T] (normalized waveforms) -> features [N, 4 width]."""
        spec = torch.log(self.mel(x) + 1e-5)
        spec = (spec - spec.mean(dim=(1, 2), keepdim=True)) / (spec.std(dim=(1, 2), keepdim=True) + 1e-5)
        return self.net(spec[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _fixed_length(x: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, dtype=np.float32)
    out[: min(length, x.size)] = x[:length]
    return out


def split_waves(data: PreparedAudio, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All clips of a split, normalized by the global scale, as [N, clip length], and labels [N]."""
    entries = data.entries(split)
    if any(e["label"] < 0 for e in entries):
        raise AudioError("metrics needs labeled spoken digits: use data=digits")
    length = max(e["frames"] for e in entries)
    waves = np.stack([_fixed_length(data.load(e), length) for e in entries]) / data.scale
    return torch.from_numpy(waves.astype(np.float32)), torch.tensor([e["label"] for e in entries])


def train_classifier(data: PreparedAudio, settings: dict[str, Any], log=print) -> tuple[DigitClassifier, float]:
    """The cached classifier of ``data`` (trained now if absent) and its test-split accuracy."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    path = data.folder / f"classifier-{key}.pt"
    model = DigitClassifier(data.sample_rate, width=int(settings["width"]))
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), float(saved["test_accuracy"])
    torch.manual_seed(int(settings["seed"]))
    waves, labels = split_waves(data, "train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(settings["lr"]), weight_decay=1e-4)
    batch, epochs = int(settings["batch_size"]), int(settings["epochs"])
    generator = torch.Generator().manual_seed(int(settings["seed"]))
    steps = epochs * math.ceil(len(waves) / batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=float(settings["lr"]), total_steps=steps)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(waves), generator=generator)
        correct = 0
        for first in range(0, len(waves), batch):
            idx = order[first:first + batch]
            x = waves[idx]
            # Augment: gain and a time shift, so the classifier keys on the word, not its level or place.
            x = x * torch.empty(len(idx), 1).uniform_(0.5, 1.5, generator=generator)
            x = torch.roll(x, int(torch.randint(-1600, 1601, (1,), generator=generator)), dims=1)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            correct += int((logits.argmax(-1) == labels[idx]).sum())
        log(f"classifier epoch {epoch + 1}/{epochs}: train accuracy {correct / len(waves):.3f}")
    model.eval()
    test_waves, test_labels = split_waves(data, "test")
    accuracy = float((predict(model, test_waves)[1].argmax(-1) == test_labels).float().mean())
    atomic_write(path, lambda tmp: torch.save({"state_dict": model.state_dict(), "test_accuracy": accuracy}, tmp))
    return model, accuracy


@torch.no_grad()
def predict(model: DigitClassifier, waves: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, F] float64, posteriors [N, 10] float64) of normalized waveforms [N, T]."""
    feats, probs = [], []
    for first in range(0, len(waves), batch):
        f = model.features(waves[first:first + batch])
        feats.append(f.double())
        probs.append(model.head(f).softmax(-1).double())
    return torch.cat(feats), torch.cat(probs)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between Gaussians fitted to feature sets a [N, F] and b [M, F]."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # singular product: regularize, as the reference FID code does
        eye = np.eye(cov_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov_a + eye) @ (cov_b + eye))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean.real))


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    eps = 1e-12
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1)


def scores(probs: torch.Tensor, feats: torch.Tensor, train_probs: torch.Tensor, train_feats: torch.Tensor) -> dict[str, float]:
    """FID, IS, mIS and AM of a set (its posteriors [N, 10] and features) against the training set."""
    marginal = probs.mean(0)
    inception = math.exp(float(_kl(probs, marginal[None]).mean()))
    modified = math.exp(float(_kl(probs[:, None], probs[None]).mean()))
    entropy = float(-(probs * torch.log(probs + 1e-12)).sum(-1).mean())
    am = float(_kl(train_probs.mean(0), marginal)) + entropy
    return {"FID": frechet_distance(feats, train_feats), "IS": inception, "mIS": modified, "AM": am}


def load_folder(folder: str | Path, sample_rate: int, length: int, scale: float) -> torch.Tensor:
    """The WAVs of a folder as normalized waveforms [N, length] (cropped / zero-padded)."""
    files = find_audio([str(folder)])
    waves = [_fixed_length(read_audio(f, sample_rate, resample=True, mix_to_mono=True, allow_clipping=True), length)
             for f in files]
    return torch.from_numpy(np.stack(waves) / scale).float()


def metrics(cfg: DictConfig) -> dict[str, Any]:
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data = prepare(data_cfg)  # type: ignore[arg-type]
    settings = OmegaConf.to_container(cfg.classifier, resolve=True)
    classifier, accuracy = train_classifier(data, settings)  # type: ignore[arg-type]
    train_waves, _ = split_waves(data, "train")
    train_feats, train_probs = predict(classifier, train_waves)
    test_waves, _ = split_waves(data, "test")
    rows: dict[str, dict[str, float]] = {}
    feats, probs = predict(classifier, test_waves)
    rows["test split (reference)"] = scores(probs, feats, train_probs, train_feats)
    samples = cfg.get("samples") or []
    samples = [samples] if isinstance(samples, str) else list(samples)
    length = train_waves.shape[1]
    for folder in samples:
        waves = load_folder(folder, data.sample_rate, length, data.scale)
        feats, probs = predict(classifier, waves)
        rows[str(folder)] = scores(probs, feats, train_probs, train_feats)
        rows[str(folder)]["n"] = len(waves)
    print(f"digit classifier accuracy on the test split (unseen voices): {accuracy:.3f}")
    print(f"| {'set':<40} | {'FID':>8} | {'IS':>6} | {'mIS':>7} | {'AM':>6} |")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 8}|{'-' * 9}|{'-' * 8}|")
    for name, row in rows.items():
        print(f"| {name:<40} | {row['FID']:>8.3f} | {row['IS']:>6.3f} | {row['mIS']:>7.3f} | {row['AM']:>6.3f} |")
    return {"classifier_accuracy": accuracy, "rows": rows}
