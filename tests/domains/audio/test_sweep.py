"""``python -m domains.audio sweep`` end to end (in-process Hydra multirun) on a few dozen synthesized
digits: the shipped context sweep at a still smaller size (2 families x 2 context lengths, both scaled
to one parameter target, fixed samples a step), the eval loss recomputed by hand, the FLOPs of the
multi-scale model against torch's flop counter, and the report."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from core.cli import CONFIG_ROOT
from core.sweep import ResultsTable
from domains.audio.__main__ import main
from domains.audio.data import Quantization, Windows, prepare
from domains.audio.model import build_model, load_audio_export
from domains.audio.sweep import flops_per_sample, parameter_counts, scale_spec

from .conftest import TINY_DIGITS, needs_espeak


def run_cli(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # run_command rewrites sys.argv for Hydra
    main(["domains.audio", *args])


@needs_espeak
def test_context_sweep(audio_cache: Path, tmp_path: Path, monkeypatch, capsys):
    run_cli(monkeypatch, "sweep", "context-cpu", *TINY_DIGITS, f"data.cache_dir={audio_cache}",
            f"sweep.dir={tmp_path / 'sweep'}", "point.family=mamba,s4d", "seq_len=64,128", "point.size=20K",
            "sweep.tokens.value=512", "sweep.tokens_per_batch=256", "sweep.eval.clips=1", "sweep.eval.batch_size=256",
            "trainer.log_every_n_steps=1")
    records = ResultsTable(tmp_path / "sweep").records()
    assert sorted((r["family"], r["seq_len"], r["batch_size"]) for r in records) == [
        ("mamba", 64, 4), ("mamba", 128, 2), ("s4d", 64, 4), ("s4d", 128, 2)]
    for r in records:
        model, meta = load_audio_export(tmp_path / "sweep" / r["run_dir"])
        built = sum(p.numel() for p in model.parameters())
        assert r["params_total"] == built == parameter_counts(meta["spec"], 256)["total"]
        assert abs(math.log(r["params_non_embedding"] / 20_000)) < math.log(1.6) and r["tokens"] == 512
        assert r["flops"] == pytest.approx(flops_per_sample(meta["spec"], 256, r["seq_len"], r["batch_size"]) * 512)
        # The eval loss by hand: the first validation clip, whole, in windows of the context.
        data = prepare({**meta["extra"]["data"], "cache_dir": str(audio_cache)})
        data.manifest["scale"] = meta["audio"]["scale"]
        windows = Windows(data, "val", r["seq_len"], Quantization("mu-law", 8))
        items = [windows[i] for i, (clip, _) in enumerate(windows.index) if clip == 0]
        ids, labels = torch.stack([x["input_ids"] for x in items]), torch.stack([x["labels"] for x in items])
        with torch.no_grad():
            logits = model(ids).logits
        mask = labels != -100
        nll = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
        assert int(mask.sum()) == data.entries("val")[0]["frames"] == r["eval_tokens"]  # every sample once
        assert r["eval_clips"] == 1 and r["eval_loss"] == pytest.approx(float(nll), rel=1e-5)
        assert r["eval_bits_per_sample"] == pytest.approx(r["eval_loss"] / math.log(2))
    run_cli(monkeypatch, "sweep", "report", "context-cpu", f"sweep.dir={tmp_path / 'sweep'}")
    assert "eval_bits_per_sample" in capsys.readouterr().out
    assert (tmp_path / "sweep" / "report" / "loss_vs_seq_len.png").is_file()


@pytest.mark.parametrize("backbone", ["multiscale", "flat"])
def test_flops_per_sample_match_the_flop_counter(backbone: str):
    """Attention + MLP blocks (all matmuls, which torch's counter sees exactly with the math attention
    backend): the multi-scale accounting (levels, pooling projections, head) equals the counted FLOPs."""
    spec = {"backbone": backbone, "pools": [4, 2], "expand": 2, "center_pattern": None,
            "config": {"d_model": 16, "pattern": "*-", "tie_embeddings": False, "attention": {"n_heads": 2},
                       "mlp": {"activation": "gelu", "hidden_size": 32}}}
    model = build_model(spec, 256)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 256, (2, 64)))
    assert flops_per_sample(spec, 256, 64, 2) == pytest.approx(3 * counter.get_total_flops() / (2 * 64))


def test_width_scaling_hits_the_target():
    from domains.audio.sweep import load_spec

    for name in ("sashimi-mamba", "sashimi-s4d"):
        spec, target = scale_spec(load_spec(name), "300K", "non_embedding", 256)
        params = parameter_counts(spec, 256)["non_embedding"]
        assert target == 300_000 and abs(math.log(params / target)) < math.log(1.2)
        assert sum(p.numel() for p in build_model(spec, 256).parameters()) == parameter_counts(spec, 256)["total"]


@pytest.mark.parametrize("name", ["context-cpu", "context"])
def test_shipped_sweeps_compose(name: str):
    with initialize_config_dir(config_dir=str(CONFIG_ROOT / "audio"), version_base="1.3"):
        cfg = compose("sweep", overrides=[f"sweep={name}"], return_hydra_config=True)
    assert cfg.sweep.name == name and cfg.hydra.mode.name == "MULTIRUN"
    lengths = [int(v) for v in str(cfg.hydra.sweeper.params["seq_len"]).split(",")]
    assert max(lengths) <= int(cfg.sweep.tokens_per_batch)
    for family in cfg.sweep.families.values():
        assert (CONFIG_ROOT / "audio" / "model" / f"{family}.yaml").is_file()
