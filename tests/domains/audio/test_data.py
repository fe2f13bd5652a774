"""Audio data: reading and the bad inputs users meet, the folder source, the digit synthesis, MIDI
rendering, and the windows the models train on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from domains.audio.data import (
    AudioError,
    Quantization,
    RandomCrops,
    Windows,
    find_audio,
    force_piano,
    prepare,
    read_audio,
    window_example,
)
from domains.audio.quantize import normalize, quantize

from .conftest import needs_espeak

SR = 16000


def tone(seconds: float, freq: float = 440.0, amp: float = 0.5, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_bad_inputs_are_named(tmp_path: Path):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF not really a wav file")
    with pytest.raises(AudioError, match="cannot read .*garbage.wav"):
        read_audio(garbage, SR)

    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(AudioError, match="empty"):
        read_audio(empty, SR)

    stereo = tmp_path / "stereo.flac"
    sf.write(stereo, np.stack([tone(0.1), -tone(0.1) * 0.5], 1), SR)
    with pytest.raises(AudioError, match="2 channels.*mix_to_mono=true"):
        read_audio(stereo, SR, mix_to_mono=False)
    assert np.allclose(read_audio(stereo, SR), tone(0.1) * 0.25, atol=1e-4)

    slow = tmp_path / "8k.wav"
    sf.write(slow, tone(0.5, sr=8000), 8000)
    with pytest.raises(AudioError, match="8000 Hz.*resample=true"):
        read_audio(slow, SR, resample=False)
    resampled = read_audio(slow, SR)
    assert resampled.shape == (8000,)
    assert abs(np.abs(resampled[100:-100]).max() - 0.5) < 0.02  # the tone survives the resampling

    clipped = tmp_path / "clipped.ogg"
    sf.write(clipped, np.clip(tone(0.2, amp=3.0), -1, 1), SR)
    with pytest.raises(AudioError, match="clipped.*allow_clipping=true"):
        read_audio(clipped, SR)
    assert read_audio(clipped, SR, allow_clipping=True).size > 0

    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "notes.txt").write_text("no audio here")
    with pytest.raises(AudioError, match="no audio files"):
        find_audio([str(tmp_path / "none")])


def folder_config(root: Path, cache: Path, **extra) -> dict:
    return {"source": "folder", "sample_rate": SR, "paths": [str(root)], "resample": True, "mix_to_mono": True,
            "allow_clipping": False, "min_seconds": 0.0, "val_fraction": 0.2, "test_fraction": 0.2, "seed": 0,
            "cache_dir": str(cache), **extra}


def test_folder_source_splits_scales_and_crops(tmp_path: Path):
    root = tmp_path / "music"
    root.mkdir()
    for i in range(6):
        sr = 22050 if i == 0 else SR  # one file at another rate, resampled on load
        sf.write(root / f"piece{i}.wav", tone(0.3 + 0.05 * i, 200 + 50 * i, 0.1 * (i + 1), sr), sr)
    data = prepare(folder_config(root, tmp_path / "cache"))
    splits = data.manifest["splits"]
    assert sorted(len(splits[s]) for s in ("train", "val", "test")) == [1, 1, 4]
    names = [Path(e["path"]).name for s in splits.values() for e in s]
    assert sorted(names) == [f"piece{i}.wav" for i in range(6)]
    peak = max(np.abs(data.load(e)).max() for e in splits["train"])
    assert data.scale == pytest.approx(peak, rel=1e-6)  # ONE scale: the training split's peak
    leftovers = [p.name for p in (tmp_path / "cache" / "audio").iterdir()]
    assert leftovers == [data.folder.name]  # written atomically: no temporary folder left
    assert prepare(folder_config(root, tmp_path / "cache")).folder == data.folder  # cached

    quant = Quantization()
    crops = RandomCrops(data, "train", seq_len=1000, num_samples=10, seed=3, quant=quant)
    a, b = crops[7], RandomCrops(data, "train", 1000, 10, 3, quant)[7]
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["input_ids"][1:], a["labels"][:-1])  # next-sample prediction

    windows = Windows(data, "test", seq_len=1000, quant=quant)
    entry = data.entries("test")[0]
    tokens = quantize(normalize(torch.from_numpy(data.load(entry)), data.scale))
    assert len(windows) == -(-entry["frames"] // 1000)
    second = windows[1]
    assert second["input_ids"][0] == tokens[999]  # the sample before the window feeds its first step
    assert torch.equal(second["labels"][: min(1000, tokens.numel() - 1000)], tokens[1000:2000])
    last = windows[len(windows) - 1]
    assert (last["labels"] == -100).sum() == 1000 * len(windows) - entry["frames"]


def test_folder_source_refuses_a_bad_file(tmp_path: Path):
    root = tmp_path / "wavs"
    root.mkdir()
    sf.write(root / "ok.wav", tone(0.2), SR)
    sf.write(root / "stereo.wav", np.stack([tone(0.2), tone(0.2)], 1), SR)
    with pytest.raises(AudioError, match="stereo.wav has 2 channels"):
        prepare(folder_config(root, tmp_path / "cache", mix_to_mono=False))
    assert not any((tmp_path / "cache" / "audio").iterdir())  # nothing half-written
    with pytest.raises(AudioError, match="no audio files"):
        prepare(folder_config(tmp_path / "cache", tmp_path / "cache2"))


def test_window_example_at_the_start_of_a_clip():
    example = window_example(torch.tensor([5, 6, 7]), 0, 5, bits=8)
    assert example["input_ids"].tolist() == [128, 5, 6, 128, 128]
    assert example["labels"].tolist() == [5, 6, 7, -100, -100]


def _midi(events: bytes) -> bytes:
    header = b"MThd" + (6).to_bytes(4, "big") + (0).to_bytes(2, "big") + (1).to_bytes(2, "big") + (96).to_bytes(2, "big")
    return header + b"MTrk" + len(events).to_bytes(4, "big") + events


# program change ch0 -> 40 (violin), a note on/off, a drum note on channel 10, a meta tempo, end of track
MIDI_EVENTS = bytes([0x00, 0xC0, 40, 0x00, 0x90, 60, 100, 0x00, 0x99, 36, 90, 0x00, 0xFF, 0x51, 0x03, 0x07, 0xA1, 0x20,
                     0x81, 0x40, 0x80, 60, 0, 0x00, 0x89, 36, 0, 0x00, 0xFF, 0x2F, 0x00])


def test_force_piano_rewrites_programs_and_mutes_drums():
    out = force_piano(_midi(MIDI_EVENTS))
    events = out[22:]
    assert len(out) == len(_midi(MIDI_EVENTS))
    assert events[2] == 0  # program 40 -> 0
    assert events[5:7] == bytes([60, 100])  # melodic note untouched
    assert events[9:11] == bytes([36, 0])  # drum note-on at velocity 0
    assert events[12:18] == bytes([0xFF, 0x51, 0x03, 0x07, 0xA1, 0x20])  # meta event untouched
    with pytest.raises(AudioError, match="MThd"):
        force_piano(b"not midi")


@pytest.mark.skipif(shutil.which("fluidsynth") is None or not any(
    Path(p).is_file() for p in ("/usr/share/sounds/sf2/TimGM6mb.sf2", "/usr/share/sounds/sf2/FluidR3_GM.sf2",
                                "/usr/share/sounds/sf2/default-GM.sf2")), reason="fluidsynth or a GM soundfont missing")
def test_music_source_renders_midi(tmp_path: Path):
    midis = tmp_path / "midi"
    midis.mkdir()
    for i in range(3):
        note = 60 + 4 * i
        events = bytes([0x00, 0xC0, 40, 0x00, 0x90, note, 100, 0x83, 0x00, 0x80, note, 0, 0x00, 0xFF, 0x2F, 0x00])
        (midis / f"piece{i}.mid").write_bytes(_midi(events))
    cfg = {"source": "music", "sample_rate": SR, "paths": [str(midis)], "soundfont": None, "force_piano": True,
           "gain": 0.6, "max_seconds": None, "val_fraction": 0.34, "test_fraction": 0.34, "seed": 0,
           "cache_dir": str(tmp_path / "cache"), "workers": 2}
    data = prepare(cfg)
    assert [len(data.manifest["splits"][s]) for s in ("train", "val", "test")] == [1, 1, 1]
    x = data.load(data.entries("train")[0])
    assert x.size > SR // 4 and np.abs(x).max() > 0.01  # a rendered note, silence trimmed
    spectrum = np.abs(np.fft.rfft(x))
    assert 200 < np.argmax(spectrum) * SR / x.size < 500  # the fundamental of C4..G#4


@needs_espeak
def test_digits_are_deterministic_and_split_by_voice(tmp_path: Path):
    cfg = {"source": "digits", "sample_rate": SR, "clip_seconds": 1.0, "voices": ["en-us", "en-gb"],
           "variants": ["m1", "f2", "m3"], "clips_per_voice": 1, "rate_range": [130, 230], "pitch_range": [20, 80],
           "gain_range": [0.3, 0.9], "noise_range": [0.0, 0.004], "val_fraction": 0.2, "test_fraction": 0.2,
           "seed": 5, "workers": 2}
    a = prepare({**cfg, "cache_dir": str(tmp_path / "a")})
    b = prepare({**cfg, "cache_dir": str(tmp_path / "b")})
    assert json.dumps(a.manifest["splits"]) == json.dumps(b.manifest["splits"])
    entries = a.entries("test")
    assert np.array_equal(a.load(entries[0]), b.load(entries[0]))
    voices = {s: {e["group"] for e in a.manifest["splits"][s]} for s in ("train", "val", "test")}
    assert all(voices[s] for s in voices) and not (voices["train"] & voices["test"]) and not (voices["train"] & voices["val"])
    assert sum(len(v) for v in voices.values()) == 6
    for split in ("train", "test"):
        labels = sorted({e["label"] for e in a.manifest["splits"][split]})
        assert labels == list(range(10))  # every digit by every voice
    x = a.load(entries[0])
    assert x.shape == (SR,) and np.abs(x).max() > 0.2
