"""Shared fixtures: a tiny spoken-digit data set (espeak-ng) prepared once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY_DIGITS = ["data.voices=[en-us,en-gb]", "data.variants=[m1,f2,m3]", "data.clips_per_voice=1",
               "data.val_fraction=0.2", "data.test_fraction=0.2"]

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install -y espeak-ng)")


@pytest.fixture(scope="session")
def audio_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audio_cache")
