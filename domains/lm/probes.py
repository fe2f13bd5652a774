"""Long-context probes of a trained export: ``python -m domains.lm probe checkpoint=... probe=<name>``.

Probes measure what a language model retrieves or predicts at lengths it was (usually) not trained
on. They read the export's own tokenizer (``tokenizer.json``) and need nothing else but, for the
corpus haystack and perplexity, the export's training data (prepared again or reused from the cache,
as ``eval`` does) or a local text file.

=====================  ===========================================================================
probe                  what
=====================  ===========================================================================
niah_single            RULER's (Hsieh et al. 2024) needle in a haystack: one ``key -> value``
                       needle at a depth swept over the context; the question asks its value.
niah_multikey          several needles with distinct keys; one is asked (the rest distract).
niah_multiquery        several needles with distinct keys; all are asked.
niah_multivalue        one key with several values; all must be returned.
variable_tracking      RULER's variable tracking: a chain ``VAR A = 12345``, ``VAR B = A``, ... hidden
                       in the haystack; return every variable holding the value.
ppl_by_position        perplexity of held-out text as a function of position, in buckets.
=====================  ===========================================================================

Needle probes follow RULER's templates and metric: the model continues the prompt greedily and an
example scores the fraction of expected strings found in its continuation (``string_match_all``).
Keys and values are words (``adjective-noun``) or 7-digit numbers (``key_type`` / ``value_type``);
the haystack is RULER's noise sentences (``haystack=noise``), the export's held-out text
(``haystack=corpus``) or any text file (``haystack=<path>``).

Prompt construction works in tokens: the haystack is a list of sentences, each encoded once (with
its leading space), and sentences are added until the prompt reaches the requested length, so a
probe at length L has (nearly) exactly L prompt tokens. Encoding sentences separately equals encoding
the joined text wherever the byte-level BPE's pre-tokenizer splits at the spaces between sentences,
which it does for ordinary text.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.backbone import IGNORE_INDEX
from core.generate import generate

PROBES = ("niah_single", "niah_multikey", "niah_multiquery", "niah_multivalue", "variable_tracking",
          "ppl_by_position")

# RULER's "noise" haystack (scripts/data/synthetic/niah.py).
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")

# Words for keys and values (RULER draws adjective-noun pairs from the wonderwords lists).
ADJECTIVES = (
    "ancient", "bitter", "brave", "bright", "calm", "clever", "cold", "crisp", "curious", "damp", "dark",
    "eager", "early", "fancy", "fierce", "gentle", "giant", "glossy", "golden", "grumpy", "happy", "hollow",
    "humble", "icy", "jolly", "keen", "lazy", "little", "lively", "loud", "lucky", "mellow", "misty",
    "modern", "narrow", "noble", "odd", "pale", "plain", "proud", "quick", "quiet", "rapid", "rare",
    "rough", "round", "rusty", "salty", "shiny", "silent", "silver", "sleepy", "slow", "smooth", "snowy",
    "solid", "sour", "spicy", "steady", "sticky", "stormy", "sunny", "sweet", "swift", "tall", "tender",
    "tiny", "vast", "velvet", "warm", "wild", "windy", "wise", "wooden", "young", "zesty",
)
NOUNS = (
    "anchor", "apple", "arrow", "badge", "barrel", "basket", "beacon", "bell", "bridge", "button", "cabin",
    "candle", "canyon", "castle", "cherry", "cliff", "clock", "comet", "copper", "coral", "cottage",
    "crystal", "desert", "diamond", "dragon", "drum", "eagle", "engine", "falcon", "feather", "forest",
    "fountain", "garden", "glacier", "hammer", "harbor", "helmet", "island", "jacket", "jungle", "kettle",
    "ladder", "lantern", "lemon", "meadow", "mirror", "mountain", "needle", "ocean", "orchard", "paddle",
    "palace", "pebble", "pepper", "piano", "pillow", "planet", "pocket", "puzzle", "rabbit", "river",
    "rocket", "saddle", "scarf", "shadow", "shell", "spoon", "statue", "street", "tiger", "tower",
    "trumpet", "tunnel", "valley", "violin", "wagon", "whistle", "window",
)


# --------------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------------

@dataclass
class ProbeExample:
    """One prompt and what its continuation must contain.

    input_ids:      the prompt's token ids (int list), starting with the end-of-text token (the
                    training data's document separator, so the prompt starts like a document).
    answers:        strings that must all appear in the greedy continuation.
    max_new_tokens: how many tokens to generate (enough for every answer, plus a few).
    depth:          relative position of the (first) needle in the haystack, 0 = start, 1 = end.
    """

    input_ids: list[int]
    answers: list[str]
    max_new_tokens: int
    depth: float = 0.0


class Haystack:
    """Sentences as token-id lists (each with its leading space), drawn in order from a start."""

    def __init__(self, sentences: Sequence[str], encode: Callable[[str], list[int]]) -> None:
        sentences = [s.strip() for s in sentences if s.strip()]
        if not sentences:
            raise ValueError("the haystack has no text; give a non-empty haystack file or corpus")
        self.pieces = [encode(" " + s) for s in sentences]

    def take(self, budget: int, start: int) -> list[list[int]]:
        """Consecutive sentences (cycling) from ``start`` while their tokens fit in ``budget``."""
        out: list[list[int]] = []
        used, i = 0, start
        while True:
            piece = self.pieces[i % len(self.pieces)]
            if used + len(piece) > budget:
                break
            out.append(piece)
            used += len(piece)
            i += 1
            if i - start > 10 * len(self.pieces) + budget:  # a budget smaller than any piece
                break
        return out


def split_sentences(text: str) -> list[str]:
    """Sentences / lines of ``text`` (split after . ! ? and at newlines)."""
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def random_word_pair(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _draw(kind: str, rng: random.Random, taken: set[str]) -> str:
    make = {"words": random_word_pair, "numbers": random_number}.get(kind)
    if make is None:
        raise ValueError(f"key_type / value_type must be 'words' or 'numbers', got {kind!r}")
    for _ in range(1000):
        item = make(rng)
        if item not in taken:
            taken.add(item)
            return item
    raise ValueError(f"could not draw a fresh {kind} item; lower num_needles")


def _place(pieces: list[list[int]], inserts: Sequence[tuple[float, list[int]]]) -> list[int]:
    """Haystack pieces with each (depth, tokens) inserted between sentences at round(depth * n)."""
    slots: dict[int, list[list[int]]] = {}
    for depth, tokens in inserts:
        slots.setdefault(round(depth * len(pieces)), []).append(tokens)
    out: list[int] = []
    for i in range(len(pieces) + 1):
        for tokens in slots.get(i, []):
            out.extend(tokens)
        if i < len(pieces):
            out.extend(pieces[i])
    return out


@dataclass
class NeedleSettings:
    """What a needle probe varies (see the module docstring)."""

    probe: str = "niah_single"
    key_type: str = "words"
    value_type: str = "numbers"
    num_needles: int = 4
    num_hops: int = 4  # variable tracking: variables in the chain

    def __post_init__(self) -> None:
        if self.probe not in PROBES or self.probe == "ppl_by_position":
            raise ValueError(f"unknown needle probe {self.probe!r}; choose one of {list(PROBES[:-1])}")
        for name in ("key_type", "value_type"):
            if getattr(self, name) not in ("words", "numbers"):
                raise ValueError(f"{name} must be 'words' or 'numbers', got {getattr(self, name)!r}")
        if self.num_needles < 1 or self.num_hops < 1:
            raise ValueError("num_needles and num_hops must be >= 1")


def _noun(kind: str, plural: bool = False) -> str:
    word = "number" if kind == "numbers" else "word"
    return word + ("s" if plural else "")


def make_needle_example(settings: NeedleSettings, length: int, haystack: Haystack,
                        encode: Callable[[str], list[int]], eot_id: int, rng: random.Random,
                        depth: float | None = None) -> ProbeExample:
    """One prompt of about ``length`` tokens (never more) for a needle probe.

    depth: where the first needle goes (0..1); None draws it. Other needles go at random depths.
    """
    s = settings
    taken: set[str] = set()
    vt = _noun(s.value_type)
    first = rng.random() if depth is None else depth
    if s.probe == "variable_tracking":
        value = random_number(rng)
        names: list[str] = []
        while len(names) < s.num_hops:
            name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if name not in names:
                names.append(name)
        statements = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = {names[i - 1]}." for i in range(1, len(names))]
        depths = sorted([first] + [rng.uniform(first, 1.0) for _ in statements[1:]])
        needles = [(d, encode(" " + st)) for d, st in zip(depths, statements)]
        intro = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n")
        question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                    f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} "
                    f"variables are assigned the value {value}, they are:")
        answers = names
    else:
        n_keys = 1 if s.probe in ("niah_single", "niah_multivalue") else s.num_needles
        n_values = s.num_needles if s.probe == "niah_multivalue" else 1
        keys = [_draw(s.key_type, rng, taken) for _ in range(n_keys)]
        pairs = [(k, _draw(s.value_type, rng, taken)) for k in keys for _ in range(n_values)]
        depths = [first] + [rng.random() for _ in pairs[1:]]
        needles = [(d, encode(f" One of the special magic {_noun(s.value_type, True)} for {k} is: {v}."))
                   for d, (k, v) in zip(depths, pairs)]
        intro = (f"Some special magic {_noun(s.value_type, True)} are hidden within the following text. Make sure "
                 f"to memorize it. I will quiz you about the {_noun(s.value_type, True)} afterwards.\n")
        if s.probe in ("niah_single", "niah_multikey"):
            key, value = pairs[0]
            question = (f"\nWhat is the special magic {vt} for {key} mentioned in the provided text? The special "
                        f"magic {vt} for {key} mentioned in the provided text is")
            answers = [value]
        else:
            asked = keys if s.probe == "niah_multiquery" else keys[:1]
            joined = ", ".join(asked)
            question = (f"\nWhat are all the special magic {_noun(s.value_type, True)} for {joined} mentioned in "
                        f"the provided text? The special magic {_noun(s.value_type, True)} for {joined} mentioned "
                        f"in the provided text are")
            answers = [v for _, v in pairs]
    head, tail = [eot_id] + encode(intro), encode(question)
    fixed = len(head) + len(tail) + sum(len(t) for _, t in needles)
    budget = length - fixed
    if budget < 0:
        raise ValueError(f"length {length} is shorter than the probe's template and needles ({fixed} tokens); "
                         f"use lengths >= {fixed + 64}")
    pieces = haystack.take(budget, rng.randrange(len(haystack.pieces)))
    ids = head + _place(pieces, needles) + tail
    answer_tokens = sum(len(encode(" " + a)) + 2 for a in answers)
    return ProbeExample(ids, answers, max_new_tokens=answer_tokens + 4, depth=first)


def string_match_all(text: str, answers: Sequence[str]) -> float:
    """RULER's metric: the fraction of ``answers`` found in ``text`` (case-insensitive)."""
    low = text.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


# --------------------------------------------------------------------------------------------------
# Running the probes
# --------------------------------------------------------------------------------------------------

def score_needles(model: nn.Module, examples: Sequence[ProbeExample], decode: Callable[[list[int]], str],
                  pad_id: int, stop_id: int | None = None, batch_size: int = 4) -> list[float]:
    """Greedy continuation of every example's prompt, scored by :func:`string_match_all`."""
    scores: list[float] = []
    for start in range(0, len(examples), batch_size):
        part = examples[start:start + batch_size]
        out = generate(model, [e.input_ids for e in part], max_new_tokens=max(e.max_new_tokens for e in part),
                       temperature=0.0, stop_tokens=[] if stop_id is None else [stop_id], pad_token_id=pad_id)
        for example, seq in zip(part, out.sequences()):
            scores.append(string_match_all(decode([t for t in seq if t != stop_id]), example.answers))
    return scores


@torch.no_grad()
def loss_by_position(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Mean cross-entropy (nats) at each position of windows int64 [N, L + 1]: float64 [L].

    Position t predicts ``windows[:, t + 1]`` from ``windows[:, :t + 1]``.
    """
    device = next(model.parameters()).device
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for start in range(0, windows.shape[0], batch_size):
        w = windows[start:start + batch_size].to(device)
        logits = model(w[:, :-1]).logits
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none",
                                                ignore_index=IGNORE_INDEX)
        total += nll.double().sum(dim=0).cpu()
    return total / windows.shape[0]


def bucket_perplexity(losses: torch.Tensor, buckets: int) -> list[dict[str, float]]:
    """Perplexity over ``buckets`` equal spans of positions: [{"start", "end", "ppl"}]."""
    L = losses.shape[0]
    edges = [round(i * L / buckets) for i in range(buckets + 1)]
    return [{"start": a, "end": b, "ppl": math.exp(float(losses[a:b].mean()))}
            for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _supported(config: Any, length: int) -> str | None:
    """Why the model cannot run ``length`` tokens, or None."""
    if "H" in config.pattern and length > config.hyena.max_seqlen:
        return f"Hyena's filter is defined up to {config.hyena.max_seqlen} positions"
    return None


def _haystack_text(spec: str, folder: Path, tokens_needed: int) -> list[str]:
    if spec == "noise":
        return list(NOISE)
    if spec == "corpus":
        from domains.lm.evaluate import prepared_data_of

        data = prepared_data_of(folder)
        split = "test" if "test" in data.splits else "val"
        tokens = data.tokens(split)[: tokens_needed * 2]
        return split_sentences(data.tokenizer.decode([t for t in tokens.tolist() if t != data.eot_id]))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"haystack={spec}: give 'noise', 'corpus' or the path of a text file")
    return split_sentences(path.read_text(encoding="utf-8"))


def _ppl_windows(cfg: Mapping[str, Any], folder: Path, tokenizer: Any, length: int, samples: int) -> torch.Tensor:
    source = cfg.get("text") or "corpus"
    if source == "corpus":
        from domains.lm.evaluate import prepared_data_of

        data = prepared_data_of(folder)
        split = "test" if "test" in data.splits else "val"
        tokens = torch.as_tensor(data.tokens(split).astype("int64"))
    else:
        path = Path(str(source)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"text={source}: give 'corpus' or the path of a text file")
        tokens = torch.as_tensor([tokenizer.eot_id] + tokenizer.encode(path.read_text(encoding="utf-8")))
    n = min(samples, (tokens.numel() - 1) // length)
    if n < 1:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than one window of {length + 1}; "
                         "use a longer text or shorter lengths")
    return torch.stack([tokens[i * length:i * length + length + 1] for i in range(n)])


def run_probe(cfg: Any) -> dict[str, Any]:
    """The ``probe`` command: see configs/lm/probe.yaml for the keys. Returns (and optionally writes
    to ``output``) the results: one row per length."""
    from omegaconf import OmegaConf

    from core.checkpoint import load_export, read_export_info
    from domains.lm.evaluate import export_folder, pick_device
    from domains.lm.tokenizer import LMTokenizer

    c = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    name = str(c["probe"])
    if name not in PROBES:
        raise ValueError(f"probe={name}: unknown probe; choose one of {list(PROBES)}")
    folder = export_folder(str(c["checkpoint"]))
    info = read_export_info(folder)
    if info.tokenizer_path is None:
        raise FileNotFoundError(f"{folder} has no tokenizer.json; probes need the tokenizer the model was trained "
                                "with (exports of `python -m domains.lm train` have one)")
    tokenizer = LMTokenizer.load(info.tokenizer_path)
    device = pick_device(str(c.get("device", "auto")))
    model = load_export(folder, device=device)
    trained = int(info.extra.get("seq_len") or 0)
    lengths = c.get("lengths") or ([trained * m for m in (1, 2, 4, 8)] if trained else None)
    if not lengths:
        raise ValueError(f"{folder} records no training seq_len; give lengths=[...]")
    samples, seed = int(c.get("samples", 16)), int(c.get("seed", 0))
    batch_size = int(c.get("batch_size", 4))
    print(f"probe {name} of {folder} ({info.config.name or info.config.pattern}, trained at seq_len {trained or '?'})")
    rows: list[dict[str, Any]] = []
    haystack = None
    for length in [int(x) for x in lengths]:
        why = _supported(info.config, length)
        if why:
            print(f"  L={length}: skipped ({why})")
            rows.append({"length": length, "skipped": why})
            continue
        if name == "ppl_by_position":
            windows = _ppl_windows(c, folder, tokenizer, length, samples)
            losses = loss_by_position(model, windows, batch_size)
            buckets = bucket_perplexity(losses, int(c.get("buckets", 8)))
            row = {"length": length, "samples": windows.shape[0], "ppl": math.exp(float(losses.mean())),
                   "buckets": buckets}
            spans = "  ".join(f"[{b['start']},{b['end']}) {b['ppl']:.2f}" for b in buckets)
            print(f"  L={length}: ppl {row['ppl']:.2f}; by position: {spans}")
        else:
            settings = NeedleSettings(probe=name, key_type=str(c.get("key_type", "words")),
                                      value_type=str(c.get("value_type", "numbers")),
                                      num_needles=int(c.get("num_needles", 4)), num_hops=int(c.get("num_hops", 4)))
            if haystack is None:
                spec = "noise" if name == "variable_tracking" and c.get("haystack") is None else str(c.get("haystack") or "noise")
                haystack = Haystack(_haystack_text(spec, folder, max(int(x) for x in lengths)), tokenizer.encode)
            rng = random.Random(seed * 7919 + length)
            depths = [i / max(1, samples - 1) for i in range(samples)]  # a sweep over depth, as NIAH plots
            examples = [make_needle_example(settings, length, haystack, tokenizer.encode, tokenizer.eot_id, rng,
                                            depth=d) for d in depths]
            scores = score_needles(model, examples, tokenizer.decode, tokenizer.pad_id, tokenizer.eot_id, batch_size)
            by_depth = _by_depth([e.depth for e in examples], scores, int(c.get("buckets", 4)))
            row = {"length": length, "samples": len(scores), "accuracy": sum(scores) / len(scores),
                   "prompt_tokens": sum(len(e.input_ids) for e in examples) / len(examples), "by_depth": by_depth}
            print(f"  L={length}: accuracy {row['accuracy']:.3f} over {len(scores)} prompts; by depth "
                  + "  ".join(f"{d['depth']}: {d['accuracy']:.2f}" for d in by_depth))
        rows.append(row)
    results = {"probe": name, "checkpoint": str(folder), "trained_seq_len": trained, "rows": rows,
               "settings": {k: v for k, v in c.items() if k not in ("hydra",)}}
    if c.get("output"):
        out = Path(str(c["output"]))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"results: {out}")
    return results


def _by_depth(depths: Sequence[float], scores: Sequence[float], buckets: int) -> list[dict[str, Any]]:
    out = []
    for b in range(buckets):
        lo, hi = b / buckets, (b + 1) / buckets
        chosen = [s for d, s in zip(depths, scores) if lo <= d < hi or (b == buckets - 1 and d == 1.0)]
        if chosen:
            out.append({"depth": f"{lo:.2f}-{hi:.2f}", "accuracy": sum(chosen) / len(chosen), "n": len(chosen)})
    return out


__all__ = ["ADJECTIVES", "NOISE", "NOUNS", "PROBES", "Haystack", "NeedleSettings", "ProbeExample",
           "bucket_perplexity", "loss_by_position", "make_needle_example", "run_probe", "score_needles",
           "split_sentences", "string_match_all"]
