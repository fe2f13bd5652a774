"""``python -m domains.audio generate``: sample waveforms from an export, write them as WAV files.

Unconditional (every sequence starts from the silence token) or prompted (``prompt=<audio file>``: its
first ``prompt_seconds``, resampled and normalized with the model's global scale, continues in every
sample of the batch). Decoding is :func:`core.generate.generate`: one prefill, then one sample a step
with the models' caches (multi-scale levels advance every P_i samples).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from core.generate import generate
from domains.audio.data import read_audio, write_wav
from domains.audio.model import load_audio_export, max_positions, pick_device
from domains.audio.quantize import dequantize, normalize, quantize, silence_token


def check_length(model: torch.nn.Module, prompt_len: int, new_samples: int, cache_max_seqlen: int | None) -> int:
    """The cache length a generation needs (prompt + new samples); errors when it exceeds what the
    model (Hyena's filter length) or ``cache_max_seqlen`` allows."""
    needed = prompt_len + new_samples
    if cache_max_seqlen is not None and needed > int(cache_max_seqlen):
        raise ValueError(f"generating {new_samples} samples after a {prompt_len}-sample prompt needs a cache of "
                         f"{needed} positions, more than cache_max_seqlen={cache_max_seqlen} holds; lower seconds "
                         f"/ prompt_seconds or raise cache_max_seqlen")
    limit = max_positions(model)
    if limit is not None and needed > limit:
        raise ValueError(f"generating {new_samples} samples after a {prompt_len}-sample prompt needs {needed} "
                         f"positions, but this model's cache holds {limit} (its Hyena filters are defined up to "
                         "hyena.max_seqlen); generate fewer seconds")
    return needed


def save_spectrogram(waves: list[np.ndarray], sample_rate: int, path: Path, titles: list[str] | None = None) -> Path:
    """A PNG with one log-magnitude spectrogram per waveform (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(waves), 1, figsize=(8, 2.2 * len(waves)), squeeze=False)
    for i, (ax, x) in enumerate(zip(axes[:, 0], waves)):
        ax.specgram(x, NFFT=512, Fs=sample_rate, noverlap=384, cmap="magma", scale="dB")
        ax.set_ylabel("Hz")
        if titles:
            ax.set_title(titles[i], fontsize=9)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def sample(cfg: DictConfig) -> list[Path]:
    device = pick_device(str(cfg.device))
    model, meta = load_audio_export(cfg.checkpoint, device)
    audio = meta["audio"]
    sr, scale, scheme, bits = int(audio["sample_rate"]), float(audio["scale"]), audio["scheme"], int(audio["bits"])
    new_samples = int(round(float(cfg.seconds) * sr))
    if new_samples < 1:
        raise ValueError(f"seconds={cfg.seconds} is less than one sample at {sr} Hz")
    if cfg.prompt:
        x = read_audio(cfg.prompt, sr, resample=True, mix_to_mono=True, allow_clipping=True)
        x = x[: max(1, int(round(float(cfg.prompt_seconds) * sr)))]
        prompt = quantize(normalize(torch.from_numpy(x), scale), scheme, bits)
    else:
        prompt = torch.tensor([silence_token(bits)])
    check_length(model, prompt.numel(), new_samples, cfg.get("cache_max_seqlen"))
    out_dir = Path(cfg.out_dir)
    paths, waves = [], []
    n, batch = int(cfg.num_samples), int(cfg.batch_size)
    started = time.perf_counter()
    for first in range(0, n, batch):
        rows = min(batch, n - first)
        ids = prompt[None].repeat(rows, 1).to(device)
        out = generate(model, ids, max_new_tokens=new_samples, temperature=float(cfg.temperature),
                       top_k=int(cfg.top_k), top_p=float(cfg.top_p), seed=int(cfg.seed) + first)
        tokens = torch.cat([ids, out.tokens], 1) if cfg.prompt and cfg.include_prompt else out.tokens
        for row in range(rows):
            wave = (dequantize(tokens[row].cpu(), scheme, bits) * scale).numpy()
            path = out_dir / f"sample_{first + row:03d}.wav"
            write_wav(path, wave, sr)
            paths.append(path)
            waves.append(wave)
    elapsed = time.perf_counter() - started
    print(f"{n} samples of {new_samples} steps in {elapsed:.1f} s ({n * new_samples / elapsed:.0f} samples/s) -> {out_dir}")
    if cfg.get("spectrogram"):
        count = min(len(waves), int(cfg.spectrogram_rows))
        png = save_spectrogram(waves[:count], sr, out_dir / "spectrogram.png", [p.name for p in paths[:count]])
        print(f"spectrogram: {png}")
    return paths
