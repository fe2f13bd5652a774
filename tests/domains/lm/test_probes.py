"""Long-context probes: prompt construction (length, needle placement, answers), RULER's metric, the
scoring path with a model that does or does not find the needle, perplexity by position against the
model's own loss, and the ``probe`` command on a tiny export."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from core.backbone import CausalLM
from core.checkpoint import save_export
from core.cli import run_command
from core.presets import get_preset
from domains.lm.probes import (
    NOISE,
    Haystack,
    NeedleSettings,
    bucket_perplexity,
    loss_by_position,
    make_needle_example,
    run_probe,
    score_needles,
    split_sentences,
    string_match_all,
)
from domains.lm.tokenizer import LMTokenizer

TEXT = ("The model reads a long sequence. The state keeps what matters! Does the scan run in linear time? "
        "Every position of the input is seen once.\nA new line starts here. ")


@pytest.fixture(scope="module")
def tokenizer() -> LMTokenizer:
    texts = [" ".join(NOISE) + " " + TEXT + " One of the special magic numbers for calm-river is: 1234567."] * 20
    return LMTokenizer.train(texts, vocab_size=320)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, tokenizer: LMTokenizer) -> Path:
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = CausalLM(get_preset("mamba2-tiny", vocab_size=tokenizer.vocab_size))
    save_export(model, folder, tokenizer_json=tokenizer.hf.to_str(), extra={"seq_len": 64})
    return folder


def test_split_sentences() -> None:
    assert split_sentences(TEXT) == ["The model reads a long sequence.", "The state keeps what matters!",
                                     "Does the scan run in linear time?", "Every position of the input is seen once.",
                                     "A new line starts here."]


@pytest.mark.parametrize("probe", ["niah_single", "niah_multikey", "niah_multiquery", "niah_multivalue",
                                   "variable_tracking"])
@pytest.mark.parametrize("key_type, value_type", [("words", "numbers"), ("numbers", "words")])
def test_needle_prompts(tokenizer: LMTokenizer, probe: str, key_type: str, value_type: str) -> None:
    settings = NeedleSettings(probe=probe, key_type=key_type, value_type=value_type, num_needles=3, num_hops=3)
    haystack = Haystack(NOISE, tokenizer.encode)
    longest_piece = max(len(p) for p in haystack.pieces)
    for length in (700, 1201):
        example = make_needle_example(settings, length, haystack, tokenizer.encode, tokenizer.eot_id,
                                      random.Random(length))
        assert length - longest_piece < len(example.input_ids) <= length
        assert example.input_ids[0] == tokenizer.eot_id
        text = tokenizer.decode(example.input_ids[1:])
        for answer in example.answers:  # every answer is stated in the context, before the question
            assert answer in text
            assert text.index(answer) < text.rindex("?") if probe != "variable_tracking" else True
        expected = {"niah_single": 1, "niah_multikey": 1, "niah_multiquery": 3, "niah_multivalue": 3,
                    "variable_tracking": 3}[probe]
        assert len(example.answers) == expected
        if probe == "niah_multikey":
            assert text.count("One of the special magic") == 3
        if probe == "variable_tracking":
            names = example.answers
            positions = [text.index(f"VAR {n} =") for n in names]
            assert positions == sorted(positions)  # the chain is in order
            assert all(f"VAR {names[i]} = {names[i - 1]}." in text for i in range(1, len(names)))
        if value_type == "numbers" and probe.startswith("niah"):
            assert all(a.isdigit() and len(a) == 7 for a in example.answers)


def test_needle_depth_is_where_it_says(tokenizer: LMTokenizer) -> None:
    settings = NeedleSettings(probe="niah_single")
    haystack = Haystack(NOISE, tokenizer.encode)
    for depth in (0.0, 0.5, 1.0):
        ex = make_needle_example(settings, 1000, haystack, tokenizer.encode, tokenizer.eot_id, random.Random(0),
                                 depth=depth)
        text = tokenizer.decode(ex.input_ids[1:])
        body = text[text.index("\n") + 1:text.rindex("\nWhat is")]
        at = body.index("One of the special magic") / len(body)
        assert abs(at - depth) < 0.05, (depth, at)


def test_too_short_length_names_the_minimum(tokenizer: LMTokenizer) -> None:
    with pytest.raises(ValueError, match="use lengths >= "):
        make_needle_example(NeedleSettings(), 50, Haystack(NOISE, tokenizer.encode), tokenizer.encode,
                            tokenizer.eot_id, random.Random(0))
    with pytest.raises(ValueError, match="key_type"):
        NeedleSettings(key_type="uuids")


def test_string_match_all() -> None:
    assert string_match_all("the numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("only 123", ["123", "456"]) == 0.5
    assert string_match_all("CALM-RIVER", ["calm-river"]) == 1.0


class ScriptedLM(nn.Module):
    """Says ``script`` one token a step whatever it reads: a stand-in for a model that found (or missed)
    the needle, to test the scoring path with a known answer."""

    def __init__(self, script: list[int], vocab_size: int) -> None:
        super().__init__()
        self.script, self.vocab_size, self.calls = script, vocab_size, 0
        self.weight = nn.Parameter(torch.zeros(1))

    def allocate_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> None:
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, cache=None, padding_mask=None, num_last_tokens: int = 0):
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab_size)
        logits[..., token] = 1.0
        return SimpleNamespace(logits=logits)


def test_score_needles_with_a_model_that_knows_the_answer(tokenizer: LMTokenizer) -> None:
    settings = NeedleSettings(probe="niah_multivalue", num_needles=2)
    ex = make_needle_example(settings, 600, Haystack(NOISE, tokenizer.encode), tokenizer.encode, tokenizer.eot_id,
                             random.Random(1))
    right = tokenizer.encode(" " + " and ".join(ex.answers) + ".") + [tokenizer.eot_id]
    half = tokenizer.encode(" " + ex.answers[0]) + [tokenizer.eot_id]
    wrong = tokenizer.encode(" 0000000") + [tokenizer.eot_id]
    for script, expected in ((right, 1.0), (half, 0.5), (wrong, 0.0)):
        model = ScriptedLM(script, tokenizer.vocab_size)
        assert score_needles(model, [ex], tokenizer.decode, tokenizer.pad_id, tokenizer.eot_id) == [expected]


def test_loss_by_position_matches_the_model_loss() -> None:
    torch.manual_seed(0)
    model = CausalLM(get_preset("transformer++-tiny", vocab_size=50)).eval()
    windows = torch.randint(0, 50, (3, 17))
    per_position = loss_by_position(model, windows, batch_size=2)
    assert per_position.shape == (16,)
    with torch.no_grad():
        reference = model(windows[:, :-1], labels=windows[:, 1:]).ce_loss
    assert abs(float(per_position.mean()) - float(reference)) / float(reference) < 1e-5
    buckets = bucket_perplexity(per_position, 3)
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 5), (5, 11), (11, 16)]
    assert math.isclose(buckets[1]["ppl"], math.exp(float(per_position[5:11].mean())), rel_tol=1e-9)


def test_run_probe_needles_and_perplexity(export: Path, tmp_path: Path) -> None:
    result = run_probe({"checkpoint": str(export), "probe": "niah_single", "lengths": [500, 700], "samples": 3,
                        "device": "cpu", "buckets": 3, "output": str(tmp_path / "niah.json")})
    saved = json.loads((tmp_path / "niah.json").read_text())
    assert [r["length"] for r in saved["rows"]] == [500, 700] and saved["trained_seq_len"] == 64
    for row in result["rows"]:
        assert row["samples"] == 3 and 0.0 <= row["accuracy"] <= 1.0 and row["prompt_tokens"] <= row["length"]
        assert [d["n"] for d in row["by_depth"]] == [1, 1, 1]  # depths 0, 0.5, 1 swept
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 40, encoding="utf-8")
    result = run_probe({"checkpoint": str(export), "probe": "ppl_by_position", "lengths": [32, 128], "samples": 2,
                        "device": "cpu", "text": str(text), "buckets": 4})
    assert [len(r["buckets"]) for r in result["rows"]] == [4, 4]
    assert all(r["ppl"] > 1.0 and math.isfinite(r["ppl"]) for r in result["rows"])
    result = run_probe({"checkpoint": str(export), "probe": "niah_multikey", "lengths": [600], "samples": 2,
                        "device": "cpu", "haystack": str(text), "value_type": "words", "key_type": "numbers"})
    assert result["rows"][0]["samples"] == 2


def test_run_probe_errors_and_hyena_limit(tmp_path: Path, tokenizer: LMTokenizer) -> None:
    model = CausalLM(get_preset("hyena-tiny", vocab_size=tokenizer.vocab_size))  # filter up to 128 positions
    save_export(model, tmp_path / "hyena", tokenizer_json=tokenizer.hf.to_str(), extra={"seq_len": 64})
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 20, encoding="utf-8")
    result = run_probe({"checkpoint": str(tmp_path / "hyena"), "probe": "ppl_by_position", "lengths": [64, 256],
                        "samples": 1, "device": "cpu", "text": str(text)})
    assert "ppl" in result["rows"][0] and "Hyena" in result["rows"][1]["skipped"]
    save_export(model, tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        run_probe({"checkpoint": str(tmp_path / "bare"), "probe": "niah_single", "lengths": [64]})
    with pytest.raises(ValueError, match="unknown probe"):
        run_probe({"checkpoint": str(tmp_path / "hyena"), "probe": "needle"})


def test_cli_probe_command(export: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from domains.lm.__main__ import COMMANDS

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    run_command("lm", COMMANDS, argv=["domains.lm", "probe", f"checkpoint={export}", "probe=variable_tracking",
                                      "lengths=[400]", "samples=2", "device=cpu", "num_hops=2"])
    out = capsys.readouterr().out
    assert "probe variable_tracking" in out and "L=400: accuracy" in out
