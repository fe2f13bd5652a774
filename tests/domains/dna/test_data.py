"""Splits by coordinate (aligned across species), windows, labels, augmentation and the coding labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from domains.dna.data import (
    IGNORE,
    Annotation,
    ClassWindows,
    DNAData,
    LMEvalWindows,
    LMWindows,
    assign_splits,
    coding_starts,
    species_starts,
)
from domains.dna.genome import Feature
from domains.dna.tokenizer import DNATokenizer

SPECIES = ["Hsap", "Ptro", "Ggor"]


def maf_data(path: Path, tmp_path: Path, **kw) -> DNAData:
    settings = dict(path=str(path), species=SPECIES, tracks=["Hsap"], segment_bases=1000, val_fraction=0.2,
                    test_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    return DNAData({**settings, **kw}, verbose=False)


def test_assign_splits():
    names = assign_splits(10, 0.1, 0.2, seed=0)
    assert names.count("val") == 1 and names.count("test") == 2 and names.count("train") == 7
    assert assign_splits(10, 0.1, 0.2, seed=0) == names
    with pytest.raises(ValueError, match="segment_bases"):
        assign_splits(2, 0.1, 0.1, seed=0)


def test_aligned_splits_share_alignment_columns(tmp_path: Path, maf_genome):
    path, _ = maf_genome
    data = maf_data(path, tmp_path)
    blocks = data.genome.blocks
    groups: dict[int, list] = {}
    for iv in data.intervals:
        groups.setdefault(iv.group, []).append(iv)
    assert {iv.split for iv in data.intervals} == {"train", "val", "test"}
    for members in groups.values():
        assert [iv.track for iv in members] == SPECIES and len({iv.split for iv in members}) == 1
        # Every species' interval starts and ends at the same alignment block.
        rows = [int(np.flatnonzero(blocks[:, t] == iv.start)[0]) for t, iv in enumerate(members)]
        ends = [int(np.flatnonzero(blocks[:, t] == iv.end)[-1]) for t, iv in enumerate(members)]
        assert len(set(rows)) == 1 and len(set(ends)) == 1
    # The intervals of a track tile it, disjointly.
    for t, name in enumerate(SPECIES):
        ivs = sorted((iv for iv in data.intervals if iv.track == name), key=lambda iv: iv.start)
        assert ivs[0].start == 0 and ivs[-1].end == data.genome.track(name).length
        assert all(a.end == b.start for a, b in zip(ivs, ivs[1:]))


def test_fasta_splits_and_window_longer_than_interval(tmp_path: Path, fasta_genome):
    path, _ = fasta_genome
    data = DNAData(dict(path=str(path), segment_bases=1000, cache_dir=str(tmp_path / "c")), verbose=False)
    test = data.split("test")
    assert test and all(iv.split == "test" for iv in test)
    longest = max(iv.length for iv in test)
    with pytest.raises(ValueError, match=rf"window of {longest + 1:,} bases is longer .*longest is chr\d:\d+-\d+"):
        LMEvalWindows(data, "test", DNATokenizer(1), seq_len=longest, max_windows=4)
    with pytest.raises(KeyError, match="no track 'chrX'"):
        data.split("train", ["chrX"])


def test_lm_windows_labels_seed_and_n(tmp_path: Path, fasta_genome):
    path, _ = fasta_genome
    data = DNAData(dict(path=str(path), segment_bases=1000, cache_dir=str(tmp_path / "c"), max_n_fraction=1.0),
                   verbose=False)
    tok = DNATokenizer(1)
    ds = LMWindows(data, "train", tok, seq_len=33, num_samples=50, seed=3, rc_prob=0.0)
    item = ds[7]
    assert item["input_ids"].shape == (33,) and item["labels"].shape == (33,)
    targets = item["labels"] != IGNORE
    assert torch.equal(item["labels"][:-1][targets[:-1]], item["input_ids"][1:][targets[:-1]])
    assert torch.equal(ds[7]["input_ids"], item["input_ids"])  # seeded by index
    masked = LMWindows(data, "train", tok, seq_len=33, num_samples=50, seed=3, rc_prob=0.0, with_mask=True)
    assert torch.equal(masked[7]["input_ids"], item["input_ids"])
    assert any(bool(masked[i]["soft_mask"].any()) for i in range(50))  # chr1 has a lowercase stretch
    # N targets are never scored.
    saw_n = False
    for i in range(50):
        it = ds[i]
        full = torch.cat([it["input_ids"], it["labels"][-1:]])
        n_targets = full[1:] == tok.n_token
        saw_n |= bool(n_targets.any())
        assert (it["labels"][n_targets] == IGNORE).all()
    assert saw_n


def test_rc_augmentation_is_the_reverse_complement(tmp_path: Path, fasta_genome):
    path, _ = fasta_genome
    data = DNAData(dict(path=str(path), segment_bases=1000, cache_dir=str(tmp_path / "c")), verbose=False)
    tok = DNATokenizer(1)
    plain = LMWindows(data, "train", tok, 40, 20, seed=0, rc_prob=0.0)
    flipped = LMWindows(data, "train", tok, 40, 20, seed=0, rc_prob=1.0)
    comp = {"A": "T", "C": "G", "G": "C", "T": "A", "N": "N"}
    for i in range(5):
        a, b = plain[i], flipped[i]
        # The whole window: the inputs and the last target (never N here: compare where it is scored).
        if a["labels"][-1] == IGNORE or b["labels"][-1] == IGNORE:
            continue
        window_a = tok.decode(torch.cat([a["input_ids"], a["labels"][-1:]]))
        window_b = tok.decode(torch.cat([b["input_ids"], b["labels"][-1:]]))
        assert window_b == "".join(comp[c] for c in reversed(window_a))


def test_context_windows_score_the_same_targets(tmp_path: Path, fasta_genome):
    path, _ = fasta_genome
    data = DNAData(dict(path=str(path), segment_bases=2000, val_fraction=0.2, test_fraction=0.2,
                        cache_dir=str(tmp_path / "c")), verbose=False)
    tok = DNATokenizer(1)
    short = LMEvalWindows(data, "test", tok, 16, 6, context=8, max_context=64)
    long = LMEvalWindows(data, "test", tok, 16, 6, context=64, max_context=64)
    assert len(short) == len(long) > 0
    for i in range(len(short)):
        s, l = short[i], long[i]
        assert s["input_ids"].shape == (8 + 16,) and l["input_ids"].shape == (64 + 16,)
        assert int((s["labels"] != IGNORE).sum()) <= 16 and (s["labels"][:8] == IGNORE).all()
        # The scored targets are the same bases.
        assert torch.equal(s["labels"][8:], l["labels"][64:])
        assert torch.equal(s["input_ids"], l["input_ids"][56:])


def test_species_windows(tmp_path: Path, maf_genome):
    path, tracks = maf_genome
    data = maf_data(path, tmp_path)
    tok = DNATokenizer(1)
    starts = species_starts(data, "train", 200)
    train = ClassWindows(data.genome, starts, tok, 200, 0.5, num_samples=12, seed=0, rc_prob=0.0)
    for i in range(6):
        item = train[i]
        label = int(item["labels"])
        assert label == i % 3 and item["input_ids"].shape == (200,)
        assert tok.decode(item["input_ids"]) in tracks[SPECIES[label]].upper()
    test = ClassWindows(data.genome, species_starts(data, "test", 200), tok, 200, 0.5, per_class=3)
    assert len(test) == 9 and [int(test[i]["labels"]) for i in range(9)] == [0, 1, 2] * 3  # balanced prefixes
    with pytest.raises(ValueError, match="longer than every interval"):
        species_starts(data, "test", 10 ** 6)


def test_coding_labels(tmp_path: Path, fasta_genome):
    path, records = fasta_genome
    data = DNAData(dict(path=str(path), segment_bases=1000, val_fraction=0.2, test_fraction=0.2,
                        cache_dir=str(tmp_path / "c")), verbose=False)
    feats = [Feature("chr1", "mRNA", 2000, 3000, "+"), Feature("chr1", "CDS", 2100, 2900, "+"),
             Feature("chr2", "CDS", 100, 3900, "-")]
    ann = Annotation(data.genome, feats, "test.gff3")
    intergenic, coding = coding_starts(data, ann, "train", 50, None)
    for s, want in ((coding, True), (intergenic, False)):
        for track, pos in s.evenly(20):
            cds = ann.cds[track][pos:pos + 50]
            genic = ann.genic[track][pos:pos + 50]
            assert cds.all() if want else not genic.any()
    short = Annotation(data.genome, [Feature(c, "CDS", p + 400, p + 500, "+") for c in ("chr1", "chr2")
                                     for p in range(0, 4000, 1000)], "short.gff3")
    with pytest.raises(ValueError, match="no coding window of 500 bases"):
        coding_starts(data, short, "train", 500, None)
    # A label span at the centre: the flanks may be anything.
    _, centred = coding_starts(data, short, "train", 500, 50)
    for track, pos in centred.evenly(10):
        assert short.cds[track][pos + 225:pos + 275].all()
    with pytest.raises(ValueError, match="runs past the end"):
        Annotation(data.genome, [Feature("chr2", "CDS", 100, 99999, "+")], "x.gff3")


def test_unigram_baseline(tmp_path: Path):
    from tests.domains.dna.conftest import write_fasta

    path = tmp_path / "skewed.fa"
    rng = np.random.default_rng(0)
    seq = "".join(rng.choice(list("ACGT"), p=[0.7, 0.1, 0.1, 0.1], size=20000))
    write_fasta(path, {"c": seq})
    data = DNAData(dict(path=str(path), segment_bases=2000, cache_dir=str(tmp_path / "c")), verbose=False)
    counts = data.base_counts("test")
    assert counts.sum() == sum(iv.length for iv in data.split("test"))
    entropy = -(0.7 * np.log2(0.7) + 3 * 0.1 * np.log2(0.1))  # 1.357 bits
    assert abs(data.unigram_bits("test") - entropy) < 0.03
