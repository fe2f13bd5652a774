"""Audio data: reading and checking files, the three sources, the prepared manifest, the datasets.

Sources (``data.source``), all prepared offline by ``python -m domains.audio prepare``:

- ``digits``: spoken digits "zero" .. "nine" synthesized with Debian's ``espeak-ng`` (an SC09 stand-in):
  every voice is an English voice with a variant (``en-us+m3``), each clip a random speaking rate,
  pitch, gain and a little noise, placed in a one-second 16 kHz window. The split is by voice, so the
  test voices are never heard in training. Deterministic from ``data.seed``.
- ``music``: MIDI files (Debian ``planetblupi-music-midi`` or ``data.paths``) rendered by ``fluidsynth``
  with a General MIDI soundfont (``timgm6mb-soundfont`` or ``fluid-soundfont-gm``) to 16 kHz mono,
  optionally every instrument forced to a piano, silence trimmed; split by piece.
- ``folder``: the user's WAV / FLAC / OGG files (``data.paths``), checked and indexed, never copied;
  resampled (``torchaudio.functional.resample``) and mixed to mono when loaded; split by file.

``prepare`` writes ``<cache_dir>/<source>-<hash of the data config>/`` atomically (a temporary folder
renamed into place): ``manifest.json`` (clips per split with their labels and lengths, the sample rate,
the ONE global scale = the training split's peak) and, for the synthesized sources, the clips as 16-bit
WAV files. Datasets load clips lazily and crop windows: random crops for training (seeded by the sample
index, so a resumed run sees the same batches), consecutive windows for evaluation.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import shutil
import subprocess
import tempfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from domains.audio.quantize import normalize, quantize, silence_token

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
SOUNDFONTS = ("/usr/share/sounds/sf2/TimGM6mb.sf2", "/usr/share/sounds/sf2/FluidR3_GM.sf2",
              "/usr/share/sounds/sf2/default-GM.sf2")
DEBIAN_MIDI = "/usr/share/planetblupi/music"


class AudioError(ValueError):
    """A problem with an audio input, naming the file and the fix."""


# --------------------------------------------------------------------------------------------------
# Reading and checking one file
# --------------------------------------------------------------------------------------------------

def read_audio(path: str | os.PathLike, sample_rate: int, resample: bool = True, mix_to_mono: bool = True,
               allow_clipping: bool = False, clip_level: float = 0.999, max_clipped_fraction: float = 0.001) -> np.ndarray:
    """The samples of an audio file as float32 [T] in [-1, 1] at ``sample_rate``, mono.

    Errors (:class:`AudioError`) name the file and the fix: unreadable, empty, non-finite, more than one
    channel without ``mix_to_mono``, another rate without ``resample``, clipped (more than
    ``max_clipped_fraction`` of the samples at ``|x| >= clip_level``) without ``allow_clipping``.
    """
    path = Path(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # libsndfile raises its own types for every kind of bad file
        raise AudioError(f"cannot read {path} as audio ({error}); give WAV, FLAC or OGG files "
                         f"({', '.join(AUDIO_EXTENSIONS)})") from error
    if data.shape[0] == 0:
        raise AudioError(f"{path} is empty (0 samples); remove it from the data")
    if not np.isfinite(data).all():
        raise AudioError(f"{path} holds NaN or infinite samples; re-export it")
    if data.shape[1] > 1:
        if not mix_to_mono:
            raise AudioError(f"{path} has {data.shape[1]} channels and the models are mono; set "
                             "data.mix_to_mono=true to average the channels")
        data = data.mean(axis=1, keepdims=True)
    x = data[:, 0]
    clipped = float(np.mean(np.abs(x) >= clip_level))
    if clipped > max_clipped_fraction and not allow_clipping:
        raise AudioError(f"{path} is clipped: {clipped:.2%} of its samples are at full scale (|x| >= {clip_level}); "
                         "the quantized peaks would be flat. Use an unclipped source, or set "
                         "data.allow_clipping=true to keep it")
    if rate != sample_rate:
        if not resample:
            raise AudioError(f"{path} is sampled at {rate} Hz, the data at {sample_rate} Hz; set data.resample=true "
                             f"to resample it, or convert it first (e.g. sox in.wav -r {sample_rate} out.wav)")
        import torchaudio.functional as AF

        x = AF.resample(torch.from_numpy(np.ascontiguousarray(x)), rate, sample_rate).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def find_audio(paths: list[str] | str) -> list[Path]:
    """Audio files (``AUDIO_EXTENSIONS``) of files / folders (recursively), sorted; an error if none."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    found: list[Path] = []
    for entry in paths:
        p = Path(entry).expanduser()
        if p.is_dir():
            found += [f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS]
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"audio path {p} does not exist")
    if not found:
        raise AudioError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {paths}; point data.paths at "
                         "folders of WAV / FLAC / OGG files")
    return sorted(set(found))


def write_wav(path: str | os.PathLike, x: np.ndarray | torch.Tensor, sample_rate: int) -> None:
    """Write float samples in [-1, 1] as a 16-bit PCM WAV (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    sf.write(str(path), np.clip(x, -1.0, 1.0), sample_rate, subtype="PCM_16")


def trim_silence(x: np.ndarray, threshold: float = 0.01, margin: int = 160) -> np.ndarray:
    """x without its leading / trailing samples below ``threshold`` of its peak (keeping ``margin``)."""
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak == 0:
        return x[:0]
    loud = np.flatnonzero(np.abs(x) >= threshold * peak)
    return x[max(0, loud[0] - margin): loud[-1] + 1 + margin]


def _assign_groups(groups: list[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Split a list of groups: a seeded shuffle, then the first ones to test and val (at least one
    each when there are three groups or more, so that small data sets still have every split)."""
    order = sorted(set(groups))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_test = max(1 if n >= 3 else 0, round(n * test_fraction))
    n_val = max(1 if n >= 3 else 0, round(n * val_fraction))
    return {g: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, g in enumerate(order)}


# --------------------------------------------------------------------------------------------------
# Source: spoken digits from espeak-ng
# --------------------------------------------------------------------------------------------------

def _require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed; on Debian / Ubuntu: apt-get install -y {package}")
    return path


def _espeak(voice: str, word: str, rate: int, pitch: int, sample_rate: int) -> np.ndarray:
    proc = subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", word],
                          capture_output=True, timeout=60)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.decode(errors='replace').strip()}; "
                           "list the voices with espeak-ng --voices=en and espeak-ng --voices=variant")
    data, rate_in = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    x = data.mean(axis=1)
    if rate_in != sample_rate:
        import torchaudio.functional as AF

        x = AF.resample(torch.from_numpy(x), rate_in, sample_rate).numpy()
    return x


def synthesize_digits(cfg: dict[str, Any], out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Write the digit clips under ``out_dir/<split>/`` and return the manifest's split lists."""
    _require_tool("espeak-ng", "espeak-ng")
    sr, length = int(cfg["sample_rate"]), int(round(float(cfg["clip_seconds"]) * int(cfg["sample_rate"])))
    voices = [f"{base}+{variant}" for base in cfg["voices"] for variant in cfg["variants"]]
    splits = _assign_groups(voices, int(cfg["seed"]), float(cfg["val_fraction"]), float(cfg["test_fraction"]))
    rng = random.Random(int(cfg["seed"]))
    jobs = []
    for voice in voices:
        for label, word in enumerate(DIGITS):
            for rep in range(int(cfg["clips_per_voice"])):
                jobs.append(dict(voice=voice, label=label, word=word, rep=rep,
                                 rate=rng.randint(*cfg["rate_range"]), pitch=rng.randint(*cfg["pitch_range"]),
                                 gain=rng.uniform(*cfg["gain_range"]), noise=rng.uniform(*cfg["noise_range"]),
                                 offset=rng.random(), seed=rng.getrandbits(32)))

    def render(job: dict[str, Any]) -> dict[str, Any]:
        x = trim_silence(_espeak(job["voice"], job["word"], job["rate"], job["pitch"], sr))
        if x.size > length:  # too slow a rate for one second: keep the start, fade out the cut
            x = x[:length].copy()
            fade = min(160, length)
            x[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
        clip = np.zeros(length, dtype=np.float32)
        start = int(job["offset"] * (length - x.size))
        clip[start:start + x.size] = x / max(float(np.abs(x).max()), 1e-6) * job["gain"]
        clip += np.random.default_rng(job["seed"]).normal(0.0, job["noise"], length).astype(np.float32)
        name = f"{job['label']}_{job['voice'].replace('+', '_')}_{job['rep']}.wav"
        split = splits[job["voice"]]
        write_wav(out_dir / split / name, clip, sr)
        return {"path": f"{split}/{name}", "label": job["label"], "group": job["voice"], "frames": length,
                "rate": job["rate"], "pitch": job["pitch"]}

    workers = int(cfg.get("workers") or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        entries = list(pool.map(render, jobs))
    return {s: [e for e in entries if e["path"].startswith(s + "/")] for s in SPLITS}


# --------------------------------------------------------------------------------------------------
# Source: MIDI rendered with fluidsynth
# --------------------------------------------------------------------------------------------------

def force_piano(midi: bytes, mute_drums: bool = True) -> bytes:
    """A standard MIDI file with every program change set to program 0 (acoustic grand piano) and,
    with ``mute_drums``, the drum channel's (10) note-ons at velocity 0. Edited in place (same length)."""
    data = bytearray(midi)
    if data[:4] != b"MThd":
        raise AudioError("not a standard MIDI file (no MThd header)")
    pos = 8 + int.from_bytes(data[4:8], "big")
    while pos + 8 <= len(data):
        kind, size = bytes(data[pos:pos + 4]), int.from_bytes(data[pos + 4:pos + 8], "big")
        start, end = pos + 8, min(len(data), pos + 8 + size)
        if kind == b"MTrk":
            _force_piano_track(data, start, end, mute_drums)
        pos = end
    return bytes(data)


def _varlen(data: bytearray, i: int) -> tuple[int, int]:
    value = 0
    while True:
        byte = data[i]
        i += 1
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, i


def _force_piano_track(data: bytearray, i: int, end: int, mute_drums: bool) -> None:
    status = 0
    while i < end:
        _, i = _varlen(data, i)  # delta time
        if data[i] & 0x80:
            status = data[i]
            i += 1
        if status == 0xFF:  # meta: type, length, data
            length, i = _varlen(data, i + 1)
            i += length
        elif status in (0xF0, 0xF7):  # sysex
            length, i = _varlen(data, i)
            i += length
        else:
            kind, channel = status & 0xF0, status & 0x0F
            if kind == 0xC0:
                data[i] = 0
                i += 1
            elif kind == 0xD0:
                i += 1
            else:
                if kind == 0x90 and channel == 9 and mute_drums:
                    data[i + 1] = 0
                i += 2


def render_music(cfg: dict[str, Any], out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Render the MIDI files with fluidsynth under ``out_dir/<split>/``; returns the split lists."""
    _require_tool("fluidsynth", "fluidsynth")
    soundfont = cfg.get("soundfont") or next((s for s in SOUNDFONTS if Path(s).is_file()), None)
    if soundfont is None or not Path(soundfont).is_file():
        raise RuntimeError("no General MIDI soundfont found; apt-get install -y timgm6mb-soundfont (small) or "
                           "fluid-soundfont-gm, or set data.soundfont=<file.sf2>")
    paths = cfg.get("paths") or [DEBIAN_MIDI]
    midis = []
    for p in map(Path, paths):
        if p.is_dir():
            midis += sorted(f for f in p.rglob("*") if f.suffix.lower() in (".mid", ".midi"))
        elif p.is_file():
            midis.append(p)
    if not midis:
        raise AudioError(f"no MIDI files (.mid, .midi) under {paths}; apt-get install -y planetblupi-music-midi "
                         f"(installs {DEBIAN_MIDI}) or set data.paths")
    sr = int(cfg["sample_rate"])
    splits = _assign_groups([m.stem for m in midis], int(cfg["seed"]), float(cfg["val_fraction"]),
                            float(cfg["test_fraction"]))

    def render(midi: Path) -> dict[str, Any] | None:
        with tempfile.TemporaryDirectory() as tmp:
            source = midi
            if cfg.get("force_piano", True):
                source = Path(tmp) / "piano.mid"
                source.write_bytes(force_piano(midi.read_bytes()))
            rendered = Path(tmp) / "out.wav"
            proc = subprocess.run(["fluidsynth", "-ni", "-q", "-g", str(cfg.get("gain", 0.6)), "-r", str(sr),
                                   "-F", str(rendered), str(soundfont), str(source)], capture_output=True, timeout=600)
            if proc.returncode != 0 or not rendered.is_file():
                raise RuntimeError(f"fluidsynth failed on {midi}: {proc.stderr.decode(errors='replace')[-500:]}")
            x = trim_silence(read_audio(rendered, sr, allow_clipping=True), threshold=0.001)
        max_seconds = cfg.get("max_seconds")
        if max_seconds:
            x = x[: int(float(max_seconds) * sr)]
        if x.size == 0:
            return None
        split = splits[midi.stem]
        write_wav(out_dir / split / f"{midi.stem}.wav", x, sr)
        return {"path": f"{split}/{midi.stem}.wav", "label": -1, "group": midi.stem, "frames": int(x.size)}

    workers = int(cfg.get("workers") or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        entries = [e for e in pool.map(render, midis) if e is not None]
    return {s: [e for e in entries if e["path"].startswith(s + "/")] for s in SPLITS}


# --------------------------------------------------------------------------------------------------
# Source: a user folder
# --------------------------------------------------------------------------------------------------

def index_folder(cfg: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Check every file of ``data.paths`` (each one read once) and split them by file."""
    if not cfg.get("paths"):
        raise AudioError("data.source=folder needs data.paths: a list of folders or files of WAV / FLAC / OGG audio")
    files = find_audio(cfg["paths"])
    sr = int(cfg["sample_rate"])
    min_frames = int(cfg.get("min_seconds", 0.0) * sr)
    splits = _assign_groups([str(f.resolve()) for f in files], int(cfg["seed"]), float(cfg["val_fraction"]),
                            float(cfg["test_fraction"]))
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for f in files:
        x = _read_with(cfg, f)
        if x.size < max(min_frames, 2):
            raise AudioError(f"{f} has {x.size} samples after resampling, fewer than data.min_seconds requires; "
                             "remove it or lower data.min_seconds")
        key = str(f.resolve())
        out[splits[key]].append({"path": key, "label": -1, "group": key, "frames": int(x.size)})
    return out


def _read_with(cfg: dict[str, Any], path: str | Path) -> np.ndarray:
    return read_audio(path, int(cfg["sample_rate"]), resample=bool(cfg.get("resample", True)),
                      mix_to_mono=bool(cfg.get("mix_to_mono", True)), allow_clipping=bool(cfg.get("allow_clipping", False)))


# --------------------------------------------------------------------------------------------------
# Prepare and the prepared data
# --------------------------------------------------------------------------------------------------

PREPARE_KEYS = {
    "digits": ("source", "sample_rate", "clip_seconds", "voices", "variants", "clips_per_voice", "rate_range",
               "pitch_range", "gain_range", "noise_range", "val_fraction", "test_fraction", "seed"),
    "music": ("source", "sample_rate", "paths", "soundfont", "force_piano", "gain", "max_seconds", "val_fraction",
              "test_fraction", "seed"),
    "folder": ("source", "sample_rate", "paths", "resample", "mix_to_mono", "allow_clipping", "min_seconds",
               "val_fraction", "test_fraction", "seed"),
}


def data_key(cfg: dict[str, Any]) -> str:
    """``<source>-<12 hex>``: a hash of the settings that change the prepared data (not workers etc.)."""
    source = cfg.get("source")
    if source not in PREPARE_KEYS:
        raise ValueError(f"unknown data.source {source!r}; choose one of {list(PREPARE_KEYS)}")
    relevant = {k: cfg.get(k) for k in PREPARE_KEYS[source]}
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{source}-{digest}"


@dataclass
class PreparedAudio:
    """A prepared data set: its folder and manifest (see the module docstring)."""

    folder: Path
    manifest: dict[str, Any]
    config: dict[str, Any]

    @property
    def sample_rate(self) -> int:
        return int(self.manifest["sample_rate"])

    @property
    def scale(self) -> float:
        return float(self.manifest["scale"])

    def entries(self, split: str) -> list[dict[str, Any]]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
        entries = self.manifest["splits"][split]
        if not entries:
            raise AudioError(f"the {split} split of {self.folder} is empty (too few voices / pieces / files for "
                             "the split fractions); add data or change data.val_fraction / data.test_fraction")
        return entries

    def path(self, entry: dict[str, Any]) -> Path:
        p = Path(entry["path"])
        return p if p.is_absolute() else self.folder / p

    def load(self, entry: dict[str, Any]) -> np.ndarray:
        """One clip, float32 [T] at the data's rate, before the global normalization."""
        if self.manifest["source"] == "folder":
            return _read_with(self.config, self.path(entry))
        return read_audio(self.path(entry), self.sample_rate, allow_clipping=True)

    def describe(self) -> str:
        counts = {s: len(self.manifest["splits"][s]) for s in SPLITS}
        hours = {s: sum(e["frames"] for e in self.manifest["splits"][s]) / self.sample_rate / 3600 for s in SPLITS}
        parts = ", ".join(f"{s} {counts[s]} clips ({hours[s] * 60:.1f} min)" for s in SPLITS)
        return f"{self.manifest['source']} at {self.sample_rate} Hz in {self.folder}: {parts}; global scale {self.scale:.4f}"


def prepare(cfg: dict[str, Any]) -> PreparedAudio:
    """Prepare the data that ``cfg`` (the ``data`` config group) describes, or reuse the cached copy."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    folder = Path(cfg.get("cache_dir") or "data_cache") / "audio" / data_key(cfg)
    if (folder / MANIFEST).is_file():
        return PreparedAudio(folder, json.loads((folder / MANIFEST).read_text()), cfg)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        source = cfg["source"]
        if source == "digits":
            splits = synthesize_digits(cfg, tmp)
        elif source == "music":
            splits = render_music(cfg, tmp)
        else:
            splits = index_folder(cfg)
        if not splits["train"]:
            raise AudioError(f"no training clips: the {source} data has too few groups for the split fractions")
        manifest = {"source": source, "sample_rate": int(cfg["sample_rate"]), "splits": splits,
                    "config": {k: cfg.get(k) for k in PREPARE_KEYS[source]}}
        staged = PreparedAudio(tmp, {**manifest, "scale": 1.0}, cfg)
        # The ONE global scale: the training split's peak, applied to every split.
        peak = max(float(np.abs(staged.load(e)).max()) for e in splits["train"])
        manifest["scale"] = peak if peak > 0 else 1.0
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process prepared it meanwhile: keep theirs
            if not (folder / MANIFEST).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PreparedAudio(folder, json.loads((folder / MANIFEST).read_text()), cfg)


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------

@dataclass
class Quantization:
    scheme: str = "mu-law"
    bits: int = 8

    @property
    def vocab_size(self) -> int:
        return 2 ** self.bits


class _ClipCache:
    """A small LRU of loaded clips (lazy loading; bounded memory)."""

    def __init__(self, data: PreparedAudio, size: int = 512) -> None:
        self.data, self.size, self.items = data, size, OrderedDict()

    def get(self, split: str, index: int) -> np.ndarray:
        key = (split, index)
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        x = self.data.load(self.data.entries(split)[index])
        self.items[key] = x
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return x


def window_example(tokens: torch.Tensor, start: int, seq_len: int, bits: int) -> dict[str, torch.Tensor]:
    """The training pair of the window ``tokens[start:start + seq_len]``: labels are the window, inputs
    the samples one step before (the silence token before the clip's first sample); labels past the
    clip's end are -100 (ignored)."""
    window = tokens[start:start + seq_len]
    previous = tokens[start - 1:start] if start > 0 else torch.tensor([silence_token(bits)])
    inputs = torch.cat([previous, window[:-1]])
    labels = torch.full((seq_len,), -100, dtype=torch.long)
    labels[: window.numel()] = window
    input_ids = torch.full((seq_len,), silence_token(bits), dtype=torch.long)
    input_ids[: inputs.numel()] = inputs
    return {"input_ids": input_ids, "labels": labels}


class RandomCrops(torch.utils.data.Dataset):
    """``num_samples`` training windows: sample i picks a clip and an offset from a generator seeded by
    (seed, i), so the windows do not depend on the order they are asked in (exact resume)."""

    def __init__(self, data: PreparedAudio, split: str, seq_len: int, num_samples: int, seed: int,
                 quant: Quantization) -> None:
        self.data, self.split, self.seq_len, self.num_samples, self.seed, self.quant = data, split, seq_len, num_samples, seed, quant
        self.frames = [e["frames"] for e in data.entries(split)]
        self.clips = _ClipCache(data)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        clip = int(rng.integers(len(self.frames)))
        frames = self.frames[clip]
        start = int(rng.integers(0, max(1, frames - self.seq_len + 1)))
        return _example(self.clips.get(self.split, clip), start, self.seq_len, self.data.scale, self.quant)


def _example(x: np.ndarray, start: int, seq_len: int, scale: float, quant: Quantization) -> dict[str, torch.Tensor]:
    """The window of clip x (float, before normalization) at ``start``, with the sample before it."""
    segment = torch.from_numpy(np.ascontiguousarray(x[max(0, start - 1): start + seq_len]))
    tokens = quantize(normalize(segment, scale), quant.scheme, quant.bits)
    return window_example(tokens, 1 if start > 0 else 0, seq_len, quant.bits)


class Windows(torch.utils.data.Dataset):
    """Every clip of a split cut into consecutive windows of ``seq_len`` (the last one shorter, its
    labels padded with -100), at most ``max_windows_per_clip`` per clip (None: all)."""

    def __init__(self, data: PreparedAudio, split: str, seq_len: int, quant: Quantization,
                 max_windows_per_clip: int | None = None) -> None:
        self.data, self.split, self.seq_len, self.quant = data, split, seq_len, quant
        self.index = []
        for clip, entry in enumerate(data.entries(split)):
            n = math.ceil(entry["frames"] / seq_len)
            if max_windows_per_clip:
                n = min(n, max_windows_per_clip)
            self.index += [(clip, w * seq_len) for w in range(n)]
        self.clips = _ClipCache(data)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        clip, start = self.index[index]
        return _example(self.clips.get(self.split, clip), start, self.seq_len, self.data.scale, self.quant)
