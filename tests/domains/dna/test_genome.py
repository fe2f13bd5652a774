"""Genome readers and the base cache: codes, soft-masking, FASTA / MAF parsing, bad inputs, the cache."""

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

import pytest

from domains.dna.genome import (
    N_CODE,
    SOFT_MASK,
    GenomeFormatError,
    decode_bases,
    encode_bases,
    load_genome,
    read_gff3,
    reverse_complement_codes,
)
from tests.domains.dna.conftest import write_maf


def test_codes_soft_mask_and_ambiguity():
    codes = encode_bases("ACGTNacgtnRy")
    assert codes.tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12, N_CODE, N_CODE | SOFT_MASK]
    assert decode_bases(codes) == "ACGTNacgtnNn"
    assert decode_bases(codes, keep_case=False) == "ACGTNACGTNNN"
    rc = reverse_complement_codes(encode_bases("AACgtN"))
    assert decode_bases(rc) == "NacGTT"


@pytest.mark.parametrize("opener", [open, gzip.open, lzma.open])
def test_fasta_plain_gz_xz_and_cache(tmp_path: Path, fasta_genome, opener, capsys):
    path, records = fasta_genome
    if opener is not open:
        packed = tmp_path / "genome.fa.packed"
        with opener(packed, "wb") as f:
            f.write(path.read_bytes())
        path = packed
    genome = load_genome(path, tmp_path / "cache")
    assert genome.track_names == ["chr1", "chr2"]
    for name, seq in records.items():
        assert decode_bases(genome.bases(name, 0, len(seq))) == seq
    assert "reading" in capsys.readouterr().out
    again = load_genome(path, tmp_path / "cache")  # reused: no second read
    assert "reading" not in capsys.readouterr().out and again.folder == genome.folder
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_cache_rebuilt_when_the_file_changes(tmp_path: Path, fasta_genome):
    path, _ = fasta_genome
    first = load_genome(path, tmp_path / "cache", verbose=False)
    path.write_text(">only\nACGTACGT\n")
    second = load_genome(path, tmp_path / "cache", verbose=False)
    assert second.folder != first.folder and second.track_names == ["only"]


@pytest.mark.parametrize("text,message", [
    ("this is just some text\nwith lines\n", "not a FASTA file"),
    ("", "holds no FASTA record"),
    (">a\nACGT\n>b\n>c\nAC\n", "record 'b' is empty"),
    (">p1\nMKVLEFIQPL\n", "protein"),
    (">a\nACGT7ACGT\n", "'7' at position 4"),
    (">a\nACGT\n>a\nAC\n", "appears twice"),
])
def test_malformed_fasta(tmp_path: Path, text: str, message: str):
    path = tmp_path / "bad.fa"
    path.write_text(text)
    with pytest.raises(GenomeFormatError, match=message):
        load_genome(path, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # nothing half-built left behind


def test_missing_file_names_it(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nothing.fa"):
        load_genome(tmp_path / "nothing.fa", tmp_path / "cache")


def test_maf_tracks_and_blocks(tmp_path: Path, maf_genome):
    path, tracks = maf_genome
    genome = load_genome(path, tmp_path / "cache", species=["Hsap", "Ptro", "Ggor"], verbose=False)
    assert genome.kind == "maf" and genome.track_names == ["Hsap", "Ptro", "Ggor"]
    for name, seq in tracks.items():
        assert decode_bases(genome.bases(name, 0, genome.track(name).length)) == seq  # gaps removed, case kept
    blocks = genome.blocks
    assert blocks.shape == (41, 3) and (blocks[0] == 0).all()
    assert blocks[1, 0] == 300 and blocks[1, 1] == 293  # block 0 of Ptro has a 7-column gap
    # Species subset and order are the caller's.
    sub = load_genome(path, tmp_path / "cache", species=["Ggor", "Hsap"], verbose=False)
    assert sub.track_names == ["Ggor", "Hsap"]


def test_maf_block_missing_a_species(tmp_path: Path):
    path = tmp_path / "broken.maf"
    write_maf(path, n_blocks=6, drop=(4, "Ptro"))
    with pytest.raises(GenomeFormatError, match=r"block 4 .*lacks species \['Ptro'\]"):
        load_genome(path, tmp_path / "cache", species=["Hsap", "Ptro", "Ggor"])
    with pytest.raises(ValueError, match="name the species"):
        load_genome(path, tmp_path / "cache")


def test_gff3(tmp_path: Path):
    path = tmp_path / "genes.gff3"
    path.write_text("##gff-version 3\n# comment\n\nchr1\tsrc\tCDS\t11\t20\t.\t+\t0\tID=a\n")
    (feature,) = read_gff3(path)
    assert (feature.seqid, feature.type, feature.start, feature.end) == ("chr1", "CDS", 10, 20)
    path.write_text("chr1 src CDS 11 20\n")
    with pytest.raises(GenomeFormatError, match="9"):
        read_gff3(path)
