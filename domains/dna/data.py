"""Splits by genomic coordinate, and the window datasets every DNA command samples from.

Splits. A genome is cut into segments of about ``segment_bases`` bases, and whole segments go to
train, validation or test (a seeded choice of ``val_fraction`` / ``test_fraction`` of them); adjacent
segments of one split merge into one interval. For a FASTA file the segments are coordinate ranges of
each record. For the apes alignment they are ranges of *alignment blocks*, cut where the reference
species (Hsap) passes a multiple of ``segment_bases``: every species' interval of a split covers the
same alignment columns, so a test window's homologue in another species is never in training (a split
by each species' own coordinates would leak: the apes are ~98% identical). Validation and test are
disjoint segments.

Windows. A window of W bases starts anywhere in an interval where it fits; training windows are drawn
with a seeded generator per sample index (so a resumed run sees the same windows, see
``core.training.ResumableSampler``), weighted by how many starts each interval offers; windows with
more than ``max_n_fraction`` N are redrawn (up to 8 times, then the least-N draw is kept). A window
longer than every interval of its split is an error naming the window and the longest interval.
Evaluation windows are fixed: spread evenly over the split's starts.

Labels for next-base prediction: ``labels[t] = ids[t + 1]``, with -100 where that target is N (or a
k-mer holding an N): N runs are trivially predictable and would flatter bits per base.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from domains.dna.genome import (
    BASE_MASK,
    N_CODE,
    SOFT_MASK,
    Feature,
    Genome,
    find_example,
    load_genome,
    match_seqid,
    read_gff3,
    reverse_complement_codes,
)
from domains.dna.tokenizer import DNATokenizer

SPLITS = ("train", "val", "test")
IGNORE = -100


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------

@dataclass
class DataSettings:
    """The ``data`` config group (configs/dna/data/*.yaml).

    path:           a FASTA (plain/.gz/.xz) or MAF (``.maf[.gz]``) file; null with ``example`` set:
                    the maffilter-examples file
    example:        ``apes`` (4-primate chr22 alignment) or ``umaydis`` (U. maydis genome + GFF3)
    species:        MAF only: the species rows to keep, in label order (the first is the reference)
    tracks:         which tracks LM pretraining reads (null: all; e.g. [Hsap] on the alignment)
    gff:            GFF3 annotation (the coding task); null with ``example: umaydis``: its GFF3
    """

    path: str | None = None
    example: str | None = None
    species: list[str] = field(default_factory=list)
    tracks: list[str] | None = None
    gff: str | None = None
    segment_bases: int = 1_000_000
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    max_n_fraction: float = 0.5
    cache_dir: str = "data_cache/dna"

    @classmethod
    def coerce(cls, data: DataSettings | Mapping[str, Any]) -> DataSettings:
        if isinstance(data, DataSettings):
            return data
        data = dict(data)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"data: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def resolved_path(self) -> Path:
        if self.path:
            return Path(self.path).expanduser()
        if self.example == "apes":
            return find_example("Gorilla/Compara.epo_5_catarrhini_hsap-projected.chr22.subset.nogap.cleaned_aln.maf.gz")
        if self.example == "umaydis":
            return find_example("Umaydis/Umaydis.fasta.gz")
        raise ValueError(f"data.path is not set and data.example={self.example!r} is not 'apes' or 'umaydis'; "
                         "set data.path=<your .fa/.fa.gz/.maf file>")

    def resolved_gff(self) -> Path | None:
        if self.gff:
            return Path(self.gff).expanduser()
        if self.example == "umaydis":
            return find_example("Umaydis/Umaydis.gff3.gz")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# --------------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """Bases ``start..end`` (0-based, half-open) of ``track``, in ``split``; ``group``: the aligned
    interval it belongs to (the same number for every species' copy of the same alignment blocks)."""

    track: str
    start: int
    end: int
    split: str
    group: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.track}:{self.start}-{self.end} ({self.length:,} bases, {self.split})"


def assign_splits(n: int, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """A split name for each of ``n`` segments: round(n * fraction) val and test segments (at least one
    each when the fraction is > 0), chosen by a seeded permutation; the rest train."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in "
                         "[0, 1) with a sum below 1")
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n_val + n_test >= n:
        raise ValueError(f"the genome has {n} segment(s) of data.segment_bases, too few for a train split beside "
                         f"{n_val} validation and {n_test} test segment(s); lower data.segment_bases")
    order = np.random.default_rng(seed).permutation(n)
    names = ["train"] * n
    for i in order[:n_val]:
        names[i] = "val"
    for i in order[n_val:n_val + n_test]:
        names[i] = "test"
    return names


def _merge(pieces: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    out: list[tuple[int, int, str]] = []
    for lo, hi, split in pieces:
        if out and out[-1][2] == split and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi, split)
        else:
            out.append((lo, hi, split))
    return out


def make_intervals(genome: Genome, settings: DataSettings) -> list[Interval]:
    """Every interval of every split (see the module docstring)."""
    seg = int(settings.segment_bases)
    if seg < 1:
        raise ValueError(f"data.segment_bases must be >= 1, got {seg}")
    if genome.blocks is not None:  # alignment: cut block ranges on the reference's coordinate
        ref = genome.blocks[:, 0]
        n_blocks = len(ref) - 1
        cuts = np.unique(np.searchsorted(ref, np.arange(seg, int(ref[-1]), seg)))
        bounds = [0, *[int(c) for c in cuts if 0 < c < n_blocks], n_blocks]
        segments = list(zip(bounds[:-1], bounds[1:]))
        names = assign_splits(len(segments), settings.val_fraction, settings.test_fraction, settings.seed)
        merged = _merge([(lo, hi, s) for (lo, hi), s in zip(segments, names)])
        out = []
        for group, (b0, b1, split) in enumerate(merged):
            for t, name in enumerate(genome.track_names):
                out.append(Interval(name, int(genome.blocks[b0, t]), int(genome.blocks[b1, t]), split, group))
        return out
    segments = []
    for name in genome.track_names:
        length = genome.track(name).length
        n = max(1, round(length / seg))
        edges = np.linspace(0, length, n + 1).astype(np.int64)
        segments += [(name, int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    names = assign_splits(len(segments), settings.val_fraction, settings.test_fraction, settings.seed)
    out, group = [], 0
    for track in genome.track_names:
        pieces = [(a, b, s) for (t, a, b), s in zip(segments, names) if t == track]
        for a, b, s in _merge(pieces):
            out.append(Interval(track, a, b, s, group))
            group += 1
    return out


# --------------------------------------------------------------------------------------------------
# Start sets: where a window may start
# --------------------------------------------------------------------------------------------------

class Starts:
    """Runs of valid window starts: run i is ``track[i]`` positions ``lo[i] .. hi[i] - 1``.

    ``sample(rng)`` draws uniformly over all starts; ``evenly(n)`` spreads n starts over them.
    """

    def __init__(self, tracks: Sequence[str], lo: np.ndarray, hi: np.ndarray) -> None:
        keep = np.asarray(hi) > np.asarray(lo)
        self.tracks = [t for t, k in zip(tracks, keep) if k]
        self.lo = np.asarray(lo, dtype=np.int64)[keep]
        self.hi = np.asarray(hi, dtype=np.int64)[keep]
        self.cum = np.concatenate([[0], np.cumsum(self.hi - self.lo)])

    @property
    def total(self) -> int:
        return int(self.cum[-1])

    def at(self, u: int) -> tuple[str, int]:
        i = int(np.searchsorted(self.cum, u, side="right") - 1)
        return self.tracks[i], int(self.lo[i] + u - self.cum[i])

    def sample(self, rng: np.random.Generator) -> tuple[str, int]:
        return self.at(int(rng.integers(self.total)))

    def evenly(self, n: int) -> list[tuple[str, int]]:
        n = min(n, self.total)
        return [self.at(int(u)) for u in (np.arange(n) * self.total) // max(n, 1)]


def interval_starts(intervals: Sequence[Interval], window: int, what: str) -> Starts:
    """The starts of ``window``-base windows inside ``intervals``; an error if none can hold one."""
    if not intervals:
        raise ValueError(f"{what}: no interval (is the split empty? check data.val_fraction/test_fraction)")
    longest = max(intervals, key=lambda iv: iv.length)
    if window > longest.length:
        raise ValueError(f"{what}: a window of {window:,} bases is longer than every interval of the split; the "
                         f"longest is {longest}. Use a shorter window, or raise data.segment_bases so that "
                         f"intervals are longer")
    return Starts([iv.track for iv in intervals], np.array([iv.start for iv in intervals]),
                  np.array([iv.end - window + 1 for iv in intervals]))


def n_fraction(codes: np.ndarray) -> float:
    return float(((codes & BASE_MASK) == N_CODE).mean()) if codes.size else 1.0


def draw_window(genome: Genome, starts: Starts, window: int, rng: np.random.Generator,
                max_n_fraction: float) -> np.ndarray:
    """A window's codes (a copy) with at most ``max_n_fraction`` N where 8 draws allow."""
    best, best_n = None, 2.0
    for _ in range(8):
        track, pos = starts.sample(rng)
        codes = genome.bases(track, pos, pos + window)
        frac = n_fraction(codes)
        if frac <= max_n_fraction:
            return np.array(codes)
        if frac < best_n:
            best, best_n = codes, frac
    return np.array(best)


def fixed_windows(genome: Genome, starts: Starts, window: int, n: int, max_n_fraction: float
                  ) -> list[tuple[str, int]]:
    """Up to ``n`` evenly spread windows with at most ``max_n_fraction`` N (twice as many looked at)."""
    out = []
    for track, pos in starts.evenly(2 * n):
        if n_fraction(genome.bases(track, pos, pos + window)) <= max_n_fraction:
            out.append((track, pos))
    if len(out) > n:  # keep the spread: every other kept window, from both ends
        out = [out[i] for i in np.linspace(0, len(out) - 1, n).round().astype(int)]
    return out


def soft_mask(codes: np.ndarray, k: int) -> torch.Tensor:
    """bool [len(codes) / k]: True where a token holds a soft-masked (lowercase) base."""
    masked = (np.asarray(codes) & SOFT_MASK) != 0
    return torch.from_numpy(masked.reshape(-1, k).any(axis=1))


def lm_example(tokenizer: DNATokenizer, codes: np.ndarray, with_mask: bool = False) -> dict[str, torch.Tensor]:
    """Codes of (L + 1) * k bases -> input_ids [L] and labels [L] (N targets ignored); with ``with_mask``
    also ``soft_mask`` bool [L] (the inputs' soft-masking, for analyses: the models never see it)."""
    ids = torch.from_numpy(tokenizer.encode(codes))
    labels = ids[1:].clone()
    labels[labels == tokenizer.n_token] = IGNORE
    item = {"input_ids": ids[:-1], "labels": labels}
    if with_mask:
        item["soft_mask"] = soft_mask(codes, tokenizer.k)[:-1]
    return item


def maybe_rc(codes: np.ndarray, rng: np.random.Generator, rc_prob: float) -> np.ndarray:
    """The reverse complement of ``codes`` with probability ``rc_prob`` (one draw from ``rng``), else codes."""
    return reverse_complement_codes(codes) if rc_prob > 0 and rng.random() < rc_prob else codes


# --------------------------------------------------------------------------------------------------
# The prepared genome
# --------------------------------------------------------------------------------------------------

class DNAData:
    """A genome with its intervals: what every command starts from."""

    def __init__(self, settings: DataSettings | Mapping[str, Any], verbose: bool = True) -> None:
        self.settings = DataSettings.coerce(settings)
        path = self.settings.resolved_path()
        self.genome = load_genome(path, self.settings.cache_dir, species=self.settings.species or None,
                                  verbose=verbose)
        self.intervals = make_intervals(self.genome, self.settings)

    def split(self, split: str, tracks: Sequence[str] | None = None) -> list[Interval]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        if tracks is not None:
            for t in tracks:
                self.genome.track(t)  # raises with the known names
        return [iv for iv in self.intervals if iv.split == split and (tracks is None or iv.track in tracks)]

    def base_counts(self, split: str, tracks: Sequence[str] | None = None) -> np.ndarray:
        """int64 [4]: how many A, C, G, T the split's intervals hold (N not counted)."""
        counts = np.zeros(8, dtype=np.int64)
        for iv in self.split(split, tracks):
            for lo in range(iv.start, iv.end, 1 << 24):  # in slices: bounded memory for long intervals
                codes = self.genome.bases(iv.track, lo, min(iv.end, lo + (1 << 24)))
                counts += np.bincount(codes & BASE_MASK, minlength=8)[:8]
        return counts[:4]

    def unigram_bits(self, split: str, tracks: Sequence[str] | None = None) -> float:
        """Cross-entropy (bits per base) of the split's bases under the training split's base frequencies:
        the baseline a model must beat (composition alone)."""
        train = self.base_counts("train", tracks) + 1
        other = self.base_counts(split, tracks)
        p = train / train.sum()
        return float(-(other * np.log2(p)).sum() / max(1, other.sum()))

    def describe(self) -> str:
        sizes = {s: sum(iv.length for iv in self.intervals if iv.split == s) for s in SPLITS}
        return (f"{self.genome.describe()}; intervals: " +
                ", ".join(f"{s} {sum(1 for iv in self.intervals if iv.split == s)} ({sizes[s]:,} bases)"
                          for s in SPLITS))


# --------------------------------------------------------------------------------------------------
# Next-base prediction
# --------------------------------------------------------------------------------------------------

class LMWindows(Dataset):
    """Training windows for next-base prediction, seeded by index: item i -> input_ids / labels [seq_len].

    Each window is (seq_len + 1) tokens = (seq_len + 1) * k bases; reverse-complemented with
    probability ``rc_prob`` (DNA has no preferred strand). ``with_mask`` adds ``soft_mask`` [seq_len].
    """

    def __init__(self, data: DNAData, split: str, tokenizer: DNATokenizer, seq_len: int, num_samples: int,
                 seed: int, rc_prob: float = 0.5, tracks: Sequence[str] | None = None,
                 with_mask: bool = False) -> None:
        self.data, self.tokenizer, self.seq_len, self.with_mask = data, tokenizer, seq_len, with_mask
        self.window = (seq_len + 1) * tokenizer.k
        self.starts = interval_starts(data.split(split, tracks), self.window, f"{split} windows")
        self.num_samples, self.seed, self.rc_prob = num_samples, seed, rc_prob

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        codes = draw_window(self.data.genome, self.starts, self.window, rng, self.data.settings.max_n_fraction)
        return lm_example(self.tokenizer, maybe_rc(codes, rng, self.rc_prob), self.with_mask)


class LMEvalWindows(Dataset):
    """Fixed evaluation windows: up to ``max_windows`` spread evenly over the split (no augmentation).

    With ``context`` set, each window scores the same ``score_len`` targets after ``context`` tokens of
    context, for every context: windows end at fixed places chosen for ``max_context``, so the perplexity
    at different contexts is measured on identical targets.
    """

    def __init__(self, data: DNAData, split: str, tokenizer: DNATokenizer, seq_len: int, max_windows: int,
                 tracks: Sequence[str] | None = None, context: int | None = None,
                 max_context: int | None = None) -> None:
        self.data, self.tokenizer = data, tokenizer
        k = tokenizer.k
        if not context:
            self.span = seq_len + 1
            self.score_from = 0
            self.shift = 0
        else:
            max_context = max_context or context
            self.span = max_context + seq_len + 1  # the longest window; shorter contexts skip its front
            self.shift = max_context - context
            self.score_from = context
        window = self.span * k
        self.places = fixed_windows(data.genome, interval_starts(data.split(split, tracks), window, f"{split} windows"),
                                    window, max_windows, data.settings.max_n_fraction)
        self.k = k

    def __len__(self) -> int:
        return len(self.places)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        track, pos = self.places[index]
        start = pos + self.shift * self.k
        codes = np.array(self.data.genome.bases(track, start, pos + self.span * self.k))
        item = lm_example(self.tokenizer, codes)
        if self.score_from:  # score only the seq_len targets after the context
            item["labels"][: self.score_from] = IGNORE
        return item


# --------------------------------------------------------------------------------------------------
# Classification: species and coding / intergenic
# --------------------------------------------------------------------------------------------------

class ClassWindows(Dataset):
    """Windows labelled by class: item -> {"input_ids": [W / k], "labels": scalar int64}.

    ``starts[c]`` are class c's window starts. Training (``num_samples`` set): class ``index % C`` (balanced),
    a seeded random start, reverse complement with ``rc_prob``. Evaluation: up to ``per_class`` fixed
    windows per class, evenly spread, in round-robin class order.
    """

    def __init__(self, genome: Genome, starts: Sequence[Starts], tokenizer: DNATokenizer, window: int,
                 max_n_fraction: float, num_samples: int | None = None, per_class: int = 0, seed: int = 0,
                 rc_prob: float = 0.0) -> None:
        if window % tokenizer.k:
            raise ValueError(f"window={window} is not a multiple of tokenizer.k={tokenizer.k}")
        self.genome, self.starts, self.tokenizer, self.window = genome, list(starts), tokenizer, window
        self.max_n_fraction, self.num_samples, self.seed, self.rc_prob = max_n_fraction, num_samples, seed, rc_prob
        self.fixed: list[tuple[int, str, int]] = []
        if num_samples is None:
            per = [[(c, t, p) for t, p in fixed_windows(genome, s, window, per_class, max_n_fraction)]
                   for c, s in enumerate(self.starts)]
            # Round-robin over the classes, so that any prefix (trainer.limit_val_batches) stays balanced.
            for i in range(max((len(p) for p in per), default=0)):
                self.fixed += [p[i] for p in per if i < len(p)]

    def __len__(self) -> int:
        return self.num_samples if self.num_samples is not None else len(self.fixed)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.num_samples is None:
            label, track, pos = self.fixed[index]
            codes = np.array(self.genome.bases(track, pos, pos + self.window))
        else:
            rng = np.random.default_rng([self.seed, index])
            label = index % len(self.starts)
            codes = draw_window(self.genome, self.starts[label], self.window, rng, self.max_n_fraction)
            codes = maybe_rc(codes, rng, self.rc_prob)
        return {"input_ids": torch.from_numpy(self.tokenizer.encode(codes)),
                "labels": torch.tensor(label, dtype=torch.int64)}


def species_starts(data: DNAData, split: str, window: int) -> list[Starts]:
    """One start set per species (track) of the alignment, over the split's aligned intervals."""
    if data.genome.blocks is None:
        raise ValueError("the species task needs an alignment (data=apes or a MAF file), got a FASTA genome")
    return [interval_starts(data.split(split, [name]), window, f"{split} windows of {name}")
            for name in data.genome.track_names]


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of each run of True in a bool array."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return edges[0::2], edges[1::2]


class Annotation:
    """Per-base coding / genic flags from a GFF3: ``cds`` (in a CDS) and ``genic`` (in any feature)."""

    def __init__(self, genome: Genome, features: Sequence[Feature], source: str) -> None:
        names = genome.track_names
        self.cds = {n: np.zeros(genome.track(n).length, dtype=bool) for n in names}
        self.genic = {n: np.zeros(genome.track(n).length, dtype=bool) for n in names}
        unmatched: set[str] = set()
        n_cds = 0
        for f in features:
            track = match_seqid(f.seqid, names)
            if track is None:
                unmatched.add(f.seqid)
                continue
            if f.end > len(self.genic[track]):
                raise ValueError(f"{source}: feature {f.type} {f.seqid}:{f.start + 1}-{f.end} runs past the end "
                                 f"of {track} ({len(self.genic[track]):,} bases): annotation of another assembly?")
            self.genic[track][f.start:f.end] = True
            if f.type == "CDS":
                self.cds[track][f.start:f.end] = True
                n_cds += 1
        if n_cds == 0:
            raise ValueError(f"{source}: no CDS feature on any sequence of the genome (GFF seqids "
                             f"{sorted(unmatched)[:5]} vs FASTA ids {names[:3]}...)")


def coding_starts(data: DNAData, annotation: Annotation, split: str, window: int,
                  label_span: int | None) -> list[Starts]:
    """[intergenic starts, coding starts]: windows whose central ``label_span`` bases (all of it when
    None) are all outside any annotated feature, or all inside CDS."""
    span = window if label_span is None else int(label_span)
    if not 1 <= span <= window:
        raise ValueError(f"task.label_span={label_span} must be in 1..window={window}")
    offset = (window - span) // 2
    intervals = data.split(split)
    interval_starts(intervals, window, f"{split} windows")  # the length check, with its message
    per_class: list[tuple[list[str], list[int], list[int]]] = [([], [], []), ([], [], [])]
    for iv in intervals:
        if iv.length < window:
            continue
        for label, flags in ((0, ~annotation.genic[iv.track]), (1, annotation.cds[iv.track])):
            seg = flags[iv.start:iv.end]
            # A start s is valid when the span [s + offset, s + offset + span) is all flagged.
            csum = np.concatenate([[0], np.cumsum(seg, dtype=np.int64)])
            ok = (csum[span:] - csum[:-span]) == span  # ok[j]: the span starting at j is all flagged
            starts = ok[offset: offset + iv.length - window + 1]
            lo, hi = _runs(starts)
            runs = per_class[label]
            runs[0].extend([iv.track] * len(lo))
            runs[1].extend((lo + iv.start).tolist())
            runs[2].extend((hi + iv.start).tolist())
    out = []
    for label, (tracks, lo, hi) in enumerate(per_class):
        s = Starts(tracks, np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64))
        if s.total == 0:
            kind = "intergenic" if label == 0 else "coding"
            raise ValueError(f"no {kind} window of {window:,} bases (label span {span:,}) in the {split} split; use "
                             f"a shorter task.window or a task.label_span smaller than the window")
        out.append(s)
    return out


def load_annotation(data: DNAData) -> Annotation:
    path = data.settings.resolved_gff()
    if path is None:
        raise ValueError("the coding task needs a GFF3 annotation: set data.gff=<file.gff3[.gz]> (or data=umaydis)")
    return Annotation(data.genome, read_gff3(path), str(path))
