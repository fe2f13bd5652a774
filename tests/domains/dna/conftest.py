"""Small synthetic genomes for the DNA tests: a FASTA with soft-masking and N runs, and a 3-species MAF
whose blocks carry gaps (fixtures only)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest


def random_dna(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("ACGT") for _ in range(n))


def mutate(rng: random.Random, seq: str, rate: float) -> str:
    return "".join(rng.choice("ACGT") if rng.random() < rate else c for c in seq)


def write_maf(path: Path, n_blocks: int = 40, block: int = 300, species=("Hsap", "Ptro", "Ggor"), seed: int = 0,
              drop: tuple[int, str] | None = None) -> dict[str, str]:
    """A MAF of ``n_blocks`` blocks; returns each species' ungapped concatenation. ``drop=(b, s)`` leaves
    species s out of block b."""
    rng = random.Random(seed)
    lines = ["##maf version=1", ""]
    tracks = {s: [] for s in species}
    pos = {s: 1000 * i for i, s in enumerate(species)}
    for b in range(n_blocks):
        ref = random_dna(rng, block)
        lines.append("a score=0")
        for i, s in enumerate(species):
            seq = ref if i == 0 else mutate(rng, ref, 0.05)
            if i > 0 and b % 3 == 0:  # a gap run in the non-reference rows
                seq = seq[:50] + "-" * 7 + seq[57:]
            if b % 5 == 0:  # soft-masked stretch
                seq = seq[:100] + seq[100:140].lower() + seq[140:]
            if drop == (b, s):
                continue
            ungapped = seq.replace("-", "")
            lines.append(f"s {s}.chr1 {pos[s]} {len(ungapped)} + 100000000 {seq}")
            pos[s] += len(ungapped) + 10
            tracks[s].append(ungapped)
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return {s: "".join(parts) for s, parts in tracks.items()}


def write_fasta(path: Path, records: dict[str, str], width: int = 60) -> None:
    with open(path, "w", encoding="ascii") as f:
        for name, seq in records.items():
            f.write(f">{name} synthetic\n")
            for i in range(0, len(seq), width):
                f.write(seq[i:i + width] + "\n")


@pytest.fixture
def fasta_genome(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Two chromosomes with soft-masked and N stretches; returns (path, {id: sequence})."""
    rng = random.Random(1)
    chr1 = random_dna(rng, 6000)
    chr1 = chr1[:1000] + chr1[1000:1500].lower() + "N" * 300 + chr1[1800:]
    chr2 = random_dna(rng, 4000)
    records = {"chr1": chr1, "chr2": chr2}
    path = tmp_path / "genome.fa"
    write_fasta(path, records)
    return path, records


@pytest.fixture
def maf_genome(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "apes.maf"
    return path, write_maf(path)
