"""Genomes on disk: FASTA / MAF readers and a memory-mapped store of bases, one byte a base.

Reading a genome is slow (text, gzip, alignment gaps); sampling a 1 Mb window from it must not be. So
each source is converted once into a cache folder and memory-mapped afterwards:

    <cache_dir>/<label>-<key>/
        bases.u8      every track's bases back to back, one uint8 a base (see the code table below)
        blocks.npy    MAF only: int64 [n_blocks + 1, n_tracks], where alignment block b starts in each
                      species' track (row n_blocks: the track lengths); a row is one set of homologous
                      alignment columns
        index.json    tracks (name, offset, length, source record ids), format version, source files
                      (path, size, mtime) and the settings key; written last

The folder is built under a temporary name next to its final one and renamed into place, so a killed
build never leaves a half-written cache; ``key`` hashes the source files' identity (path, size,
mtime) and the format version, so an edited FASTA is re-read.

Base codes (one byte): ``A=0, C=1, G=2, T=3, N=4`` in the low 3 bits, plus ``SOFT_MASK = 8`` for a
lowercase (soft-masked, usually repeat) base. IUPAC ambiguity letters (R, Y, K, M, S, W, B, D, H, V)
become N: the models see five letters. Anything else (digits, protein letters such as E, F, I, L, P, Q,
or '*') is an error naming the record, the position and the character.

A MAF alignment (``Bio.AlignIO``'s "maf" reader) becomes one track per species: the species' rows of
the blocks, gaps ('-') removed, concatenated in block order. Species are the part of the source name
before the first '.', as UCSC and Ensembl Compara write them (``Hsap.22`` -> ``Hsap``). A block missing
one of the requested species is an error (its number and line): dropping it for one species only would
misalign the others.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.checkpoint import replace_folder

FORMAT_VERSION = 1
BASES = "ACGTN"
N_CODE = 4
SOFT_MASK = 8
BASE_MASK = 7
IUPAC_AMBIGUOUS = "RYKMSWBDHV"
MAFFILTER_EXAMPLES = Path("/usr/share/doc/maffilter/examples")
MAFFILTER_HINT = ("the example genomes come from Debian's maffilter-examples package: "
                  "`apt-get install maffilter-examples` (files under /usr/share/doc/maffilter/examples/)")


class GenomeFormatError(ValueError):
    """A FASTA / MAF / GFF3 file that cannot be read as a genome (the message names file and place)."""


# --------------------------------------------------------------------------------------------------
# Base codes
# --------------------------------------------------------------------------------------------------

def _code_table() -> np.ndarray:
    table = np.full(256, 255, dtype=np.uint8)  # 255: not a nucleotide letter
    for code, base in enumerate(BASES):
        table[ord(base)] = code
        table[ord(base.lower())] = code | SOFT_MASK
    for letter in IUPAC_AMBIGUOUS:
        table[ord(letter)] = N_CODE
        table[ord(letter.lower())] = N_CODE | SOFT_MASK
    return table


CODE_TABLE = _code_table()
PROTEIN_ONLY = set("EFILPQefilpq*")


def encode_bases(text: str | bytes, where: str = "sequence") -> np.ndarray:
    """Letters -> uint8 codes [len(text)] (see the module docstring); raises on a non-nucleotide letter.

    ``where`` names the record in the error ("file.fa record chr1").
    """
    raw = np.frombuffer(text.encode("ascii", "replace") if isinstance(text, str) else text, dtype=np.uint8)
    codes = CODE_TABLE[raw]
    bad = np.flatnonzero(codes == 255)
    if bad.size:
        first = int(bad[0])
        letters = sorted({chr(c) for c in raw[bad[:1000]]})
        hint = (" It looks like a protein sequence; this needs DNA." if set(letters) & PROTEIN_ONLY
                else " Allowed: A C G T N, IUPAC ambiguity codes (read as N), lowercase for soft-masked bases.")
        raise GenomeFormatError(f"{where}: {bad.size} character(s) that are not nucleotides, first "
                                f"{chr(raw[first])!r} at position {first} (0-based); seen: {letters}.{hint}")
    return codes


def decode_bases(codes: np.ndarray, keep_case: bool = True) -> str:
    """uint8 codes -> letters (lowercase where soft-masked when ``keep_case``)."""
    codes = np.asarray(codes, dtype=np.uint8)
    letters = np.frombuffer(BASES.encode(), dtype=np.uint8)[codes & BASE_MASK]
    if keep_case:
        letters = np.where(codes & SOFT_MASK, letters + 32, letters).astype(np.uint8)
    return letters.tobytes().decode("ascii")


def reverse_complement_codes(codes: np.ndarray) -> np.ndarray:
    """The reverse complement of a code array (A<->T, C<->G, N stays; the soft-mask bit is kept)."""
    base = codes & BASE_MASK
    comp = np.where(base < 4, 3 - base, base).astype(np.uint8)
    return (comp | (codes & SOFT_MASK))[::-1].copy()


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------

def open_text(path: str | os.PathLike) -> io.TextIOBase:
    """A text handle on a plain, .gz or .xz file (by content, not by name)."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="ascii", errors="replace")
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(path, "rt", encoding="ascii", errors="replace")
    return open(path, encoding="ascii", errors="replace")


@dataclass
class Track:
    """One named sequence of the store: ``offset`` / ``length`` in bases.u8; ``records``: its sources."""

    name: str
    offset: int
    length: int
    records: list[str]


def read_fasta(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """(record id, uint8 codes) for each record of a FASTA file (plain, .gz, .xz), via Bio.SeqIO.

    Errors: a file that is not FASTA (text before the first '>', no record), an empty record, a
    duplicated id, a letter that is not a nucleotide.
    """
    from Bio import SeqIO

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FASTA file {path} does not exist")
    seen: set[str] = set()
    with open_text(path) as handle:
        try:
            records = SeqIO.parse(handle, "fasta")
            for record in records:
                where = f"{path} record {record.id!r}"
                if not record.id:
                    raise GenomeFormatError(f"{path}: a record has an empty header ('>' alone); give it a name")
                if len(record.seq) == 0:
                    raise GenomeFormatError(f"{where} is empty (a header with no sequence lines); remove it "
                                            "or add its sequence")
                if record.id in seen:
                    raise GenomeFormatError(f"{where}: the id appears twice; record ids must be unique")
                seen.add(record.id)
                yield record.id, encode_bases(bytes(record.seq), where)
        except ValueError as error:
            if isinstance(error, GenomeFormatError):
                raise
            raise GenomeFormatError(f"{path} is not a FASTA file: {str(error).splitlines()[0]} (a FASTA file "
                                    "starts with a '>name' header line, then sequence lines)") from error
    if not seen:
        raise GenomeFormatError(f"{path} holds no FASTA record (no line starting with '>'); is it a FASTA file?")


def _species(source: str) -> str:
    return source.split(".", 1)[0]


def read_maf(path: str | os.PathLike, species: Sequence[str]) -> Iterator[tuple[int, list[np.ndarray], dict[str, Any]]]:
    """(block number, [codes of each species' row, gaps removed], the first species' row annotations)
    for each alignment block of a MAF file, via Bio.AlignIO.

    Errors name the block: a species missing from it, or present twice.
    """
    from Bio import AlignIO

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MAF file {path} does not exist")
    wanted = list(species)
    n = -1
    with open_text(path) as handle:
        try:
            for n, block in enumerate(AlignIO.parse(handle, "maf")):
                rows: dict[str, Any] = {}
                for record in block:
                    name = _species(record.id)
                    if name in rows and name in wanted:
                        raise GenomeFormatError(f"{path}: alignment block {n} has two rows of species {name!r} "
                                                f"({rows[name].id}, {record.id}); keep one (e.g. with maffilter)")
                    rows[name] = record
                missing = [s for s in wanted if s not in rows]
                if missing:
                    start = rows[next(iter(rows))].annotations.get("start") if rows else None
                    raise GenomeFormatError(
                        f"{path}: alignment block {n} (first row {next(iter(rows), '?')} at {start}) lacks "
                        f"species {missing}; it has {sorted(rows)}. Every block needs every species of "
                        f"data.species={wanted} (filter the MAF to complete blocks, or drop the species)")
                codes = []
                for s in wanted:
                    seq = bytes(rows[s].seq).replace(b"-", b"").replace(b".", b"")
                    codes.append(encode_bases(seq, f"{path} block {n} species {s}"))
                yield n, codes, dict(rows[wanted[0]].annotations)
        except ValueError as error:
            if isinstance(error, GenomeFormatError):
                raise
            raise GenomeFormatError(f"{path} is not a readable MAF file (block {n + 1}): {error}") from error
    if n < 0:
        raise GenomeFormatError(f"{path} holds no MAF alignment block (lines 'a' then 's ...'); is it a MAF file?")


# --------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------

class Genome:
    """A built cache folder: named tracks over one memory-mapped uint8 array.

    ``bases(track, start, end)`` -> uint8 codes [end - start] (a view of the memmap: copy before
    writing); ``blocks`` (MAF only): int64 [n_blocks + 1, n_tracks], or None.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.index = json.loads((self.folder / "index.json").read_text(encoding="utf-8"))
        self.tracks = {t["name"]: Track(**t) for t in self.index["tracks"]}
        total = sum(t.length for t in self.tracks.values())
        self.data = np.memmap(self.folder / "bases.u8", dtype=np.uint8, mode="r", shape=(total,)) if total else \
            np.zeros(0, dtype=np.uint8)
        blocks = self.folder / "blocks.npy"
        self.blocks: np.ndarray | None = np.load(blocks) if blocks.is_file() else None
        self.kind: str = self.index["kind"]

    @property
    def track_names(self) -> list[str]:
        return list(self.tracks)

    def track(self, name: str) -> Track:
        if name not in self.tracks:
            raise KeyError(f"{self.folder} has no track {name!r}; tracks: {self.track_names}")
        return self.tracks[name]

    def bases(self, track: str, start: int, end: int) -> np.ndarray:
        t = self.track(track)
        if not 0 <= start <= end <= t.length:
            raise IndexError(f"bases {start}..{end} out of track {track!r} of length {t.length}")
        return self.data[t.offset + start: t.offset + end]

    def describe(self) -> str:
        sizes = ", ".join(f"{t.name} {t.length:,}" for t in list(self.tracks.values())[:6])
        more = f" and {len(self.tracks) - 6} more tracks" if len(self.tracks) > 6 else ""
        blocks = f", {len(self.blocks) - 1:,} alignment blocks" if self.blocks is not None else ""
        total = sum(t.length for t in self.tracks.values())
        return f"{self.kind} genome, {total:,} bases: {sizes}{more}{blocks}"


def _file_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _build_fasta(tmp: Path, path: Path) -> dict[str, Any]:
    tracks, offset = [], 0
    with open(tmp / "bases.u8", "wb") as out:
        for name, codes in read_fasta(path):
            out.write(codes.tobytes())
            tracks.append({"name": name, "offset": offset, "length": int(codes.size), "records": [name]})
            offset += int(codes.size)
    return {"kind": "fasta", "tracks": tracks}


def _build_maf(tmp: Path, path: Path, species: Sequence[str]) -> dict[str, Any]:
    # One temporary file per species (each track must be contiguous), concatenated at the end.
    parts = [open(tmp / f"part{i}.u8", "wb") for i in range(len(species))]
    offsets = [np.zeros(len(species), dtype=np.int64)]
    ref_coords = []
    try:
        for _, codes, block_info in read_maf(path, species):
            for i, c in enumerate(codes):
                parts[i].write(c.tobytes())
            offsets.append(offsets[-1] + np.array([c.size for c in codes], dtype=np.int64))
            ref_coords.append((int(block_info.get("start", -1)), int(block_info.get("size", codes[0].size))))
    finally:
        for f in parts:
            f.close()
    blocks = np.stack(offsets)
    tracks, offset = [], 0
    with open(tmp / "bases.u8", "wb") as out:
        for i, name in enumerate(species):
            part = tmp / f"part{i}.u8"
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
            part.unlink()
            length = int(blocks[-1, i])
            tracks.append({"name": name, "offset": offset, "length": length, "records": []})
            offset += length
    np.save(tmp / "blocks.npy", blocks)
    np.save(tmp / "ref_coords.npy", np.array(ref_coords, dtype=np.int64).reshape(-1, 2))
    return {"kind": "maf", "tracks": tracks}


def load_genome(path: str | os.PathLike, cache_dir: str | os.PathLike, species: Sequence[str] | None = None,
                verbose: bool = True) -> Genome:
    """Build (once) and open the cache of a FASTA or MAF file (format from the name: ``.maf[.gz|.xz]``
    is MAF, anything else FASTA). ``species`` (MAF only): the species to keep, in track order."""
    path = Path(path).expanduser()
    if not path.is_file():
        hint = f"; {MAFFILTER_HINT}" if str(path).startswith(str(MAFFILTER_EXAMPLES)) else ""
        raise FileNotFoundError(f"genome file {path} does not exist{hint}")
    is_maf = ".maf" in path.suffixes or path.suffix == ".maf"
    if is_maf and not species:
        raise ValueError(f"{path} is a MAF alignment: name the species to keep (data.species=[Hsap,Ptro,...])")
    settings = {"format_version": FORMAT_VERSION, "source": _file_identity(path),
                "species": list(species) if is_maf else None}
    key = _key(settings)
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    label = path.name.split(".")[0][:40] or "genome"
    final = root / f"{label}-{key}"
    if (final / "index.json").is_file():
        try:
            index = json.loads((final / "index.json").read_text(encoding="utf-8"))
            if index.get("settings_key") == key:
                return Genome(final)
        except (OSError, ValueError):
            pass
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        if verbose:
            print(f"reading {path} into {final} (once)")
        index = _build_maf(tmp, path, list(species or ())) if is_maf else _build_fasta(tmp, path)
        index.update({"format_version": FORMAT_VERSION, "settings_key": key, "source": settings["source"]})
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Genome(final)


def find_example(relative: str) -> Path:
    """A file of the maffilter-examples package, found by name under its examples folder."""
    path = MAFFILTER_EXAMPLES / relative
    if path.is_file():
        return path
    raise FileNotFoundError(f"{path} not found: {MAFFILTER_HINT}")


# --------------------------------------------------------------------------------------------------
# GFF3 annotations
# --------------------------------------------------------------------------------------------------

@dataclass
class Feature:
    seqid: str
    type: str
    start: int  # 0-based, inclusive
    end: int  # 0-based, exclusive
    strand: str


def read_gff3(path: str | os.PathLike) -> list[Feature]:
    """The features of a GFF3 file (plain / .gz / .xz), 1-based closed coordinates made 0-based half-open.
    Comment ('#') and blank lines are skipped; a line without 9 tab-separated columns is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GFF3 file {path} does not exist")
    features = []
    with open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip() or line.startswith("#"):
                continue
            if line.startswith(">"):  # an embedded ##FASTA section
                break
            cols = line.rstrip("\n").split("\t")
            if len(cols) != 9:
                raise GenomeFormatError(f"{path} line {number}: {len(cols)} tab-separated columns, GFF3 has 9")
            try:
                start, end = int(cols[3]), int(cols[4])
            except ValueError as error:
                raise GenomeFormatError(f"{path} line {number}: start/end are not integers: {cols[3:5]}") from error
            if start < 1 or end < start:
                raise GenomeFormatError(f"{path} line {number}: invalid interval {start}..{end} (1-based, closed)")
            features.append(Feature(cols[0], cols[2], start - 1, end, cols[6]))
    if not features:
        raise GenomeFormatError(f"{path} holds no GFF3 feature line")
    return features


def match_seqid(seqid: str, track_names: Sequence[str]) -> str | None:
    """The track a GFF seqid refers to: the same name, or the only track whose ':'/'|'-separated id
    fields contain it (``chr01`` -> ``Umaydis:chr01:1:+:2476500``)."""
    if seqid in track_names:
        return seqid
    hits = [t for t in track_names if seqid in t.replace("|", ":").split(":")]
    return hits[0] if len(hits) == 1 else None
