"""Our export format: round trip, atomic writes, dtypes, and the errors of a bad folder."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import core.checkpoint as ckpt
from core.backbone import CausalLM
from core.checkpoint import (
    CheckpointError,
    atomic_write,
    load_export,
    load_pretrained,
    read_export_info,
    save_export,
)
from core.config import ModelConfig

TOKENIZER = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}})


def mixed_config(**changes) -> ModelConfig:
    """Every block type in one pattern (vocabulary 61, padded to 64 rows)."""
    config = ModelConfig(d_model=32, pattern="SM*H-E", vocab_size=61, **changes)
    config.mamba1.d_state = 8
    config.mamba2.headdim, config.mamba2.d_state, config.mamba2.chunk_size = 16, 8, 4
    config.attention.n_heads, config.attention.n_kv_heads, config.attention.rope = 4, 2, True
    config.moe.n_experts = 4
    config.hyena.max_seqlen = 64
    return config


def build(config: ModelConfig, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(config).eval()
    with torch.no_grad():  # no parameter keeps a constant init (ones, zeros) that would hide a mix-up
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip(tied: bool, tmp_path: Path, ids: torch.Tensor) -> None:
    model = build(mixed_config(tie_embeddings=tied))
    save_export(model, tmp_path, tokenizer_json=TOKENIZER, extra={"step": 12, "data": "unit"})
    assert files(tmp_path) == ["config.json", "model.safetensors", "tokenizer.json"]  # no temporary files

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        stored = set(handle.keys())
    assert ("lm_head.weight" in stored) == (not tied)  # a tied head is stored once, as the embedding
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["format"] == "ssm-suite" and meta["format_version"] == 1 and meta["domain"] == "lm"

    loaded = load_export(tmp_path)
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.backbone.embedding.weight) == tied
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(expected) == set(got) and all(torch.equal(expected[k], got[k]) for k in expected)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    info = read_export_info(tmp_path)
    assert info.extra == {"step": 12, "data": "unit"}
    assert json.loads(info.tokenizer_path.read_text()) == json.loads(TOKENIZER)
    assert torch.equal(load_pretrained(tmp_path)(ids).logits, loaded(ids).logits)  # detected as an export


def test_tokenizer_from_path_and_overwrite(tmp_path: Path, ids: torch.Tensor) -> None:
    source = tmp_path / "tok.json"
    source.write_text(TOKENIZER)
    folder = tmp_path / "export"
    save_export(build(mixed_config(), seed=0), folder, tokenizer_json=str(source))
    second = build(mixed_config(), seed=1)
    save_export(second, folder)  # replaces the weights and config; the tokenizer file stays
    assert files(folder) == ["config.json", "model.safetensors", "tokenizer.json"]
    with torch.no_grad():
        assert torch.equal(load_export(folder)(ids).logits, second(ids).logits)


def test_dtypes(tmp_path: Path, ids: torch.Tensor) -> None:
    """A bf16 model comes back in bf16 with its float32 SSM parameters; dtype= converts on load."""
    model = CausalLM(mixed_config(), dtype=torch.bfloat16).eval()
    fp32_params = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert any(n.endswith("A_log") for n in fp32_params)
    save_export(model, tmp_path)
    loaded = load_export(tmp_path)
    assert {n: p.dtype for n, p in loaded.named_parameters()} == {n: p.dtype for n, p in model.named_parameters()}
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    upcast = load_export(tmp_path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in upcast.parameters())
    assert torch.equal(upcast.backbone.embedding.weight, model.backbone.embedding.weight.float())


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "file.bin"
    atomic_write(path, lambda tmp: tmp.write_bytes(b"old content"))

    def interrupted(tmp: Path) -> None:
        tmp.write_bytes(b"new co")  # half of the new file, then the write dies
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_bytes() == b"old content"
    assert files(tmp_path) == ["file.bin"]


def test_interrupted_save_export_leaves_old_export(tmp_path: Path, ids: torch.Tensor,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    old = build(mixed_config(), seed=0)
    save_export(old, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in files(tmp_path)}

    real_save_file = ckpt.save_file

    def dies_midway(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:  # leave a truncated file behind, as a crash would
            handle.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        save_export(build(mixed_config(), seed=1), tmp_path)
    monkeypatch.undo()

    assert {name: (tmp_path / name).read_bytes() for name in files(tmp_path)} == before  # no temp files either
    with torch.no_grad():
        assert torch.equal(load_export(tmp_path)(ids).logits, old(ids).logits)


def test_invalid_extra_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JSON-serializable"):
        save_export(build(mixed_config()), tmp_path / "out", extra={"bad": object()})
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="tokenizer"):
        save_export(build(mixed_config()), tmp_path / "out", tokenizer_json="not/a/file.json")
    assert not (tmp_path / "out").exists()


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_export(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_export(tmp_path)

    model = build(mixed_config())
    save_export(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 4}))
    with pytest.raises(CheckpointError, match=r"unknown key\(s\) \['n_layer'\]"):
        load_export(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "format_version": 2}))
    with pytest.raises(CheckpointError, match="newer"):
        load_export(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="load_pretrained"):
        load_export(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "pattern": "SM*Q-E"}))
    with pytest.raises(CheckpointError, match="unknown block character 'Q'"):
        load_export(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_export(tmp_path)


def test_weights_of_another_model_raise(tmp_path: Path) -> None:
    """config.json of one model, model.safetensors of another: every difference is named."""
    save_export(build(mixed_config()), tmp_path / "a")
    save_export(build(dataclasses.replace(mixed_config(), pattern="SM*-", vocab_size=200)), tmp_path / "b")
    os.replace(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_export(tmp_path / "a")
    message = str(error.value)
    assert "missing keys: backbone.layers.3.mixer." in message  # Hyena, '-' and 'E' where 'H-E' was
    assert ("unexpected keys: backbone.layers.3.mixer.down_proj.weight; backbone.layers.3.mixer.gate_proj.weight; "
            "backbone.layers.3.mixer.up_proj.weight\n") in message  # '-' where 'H' was
    assert "shape mismatches: backbone.embedding.weight: checkpoint (200, 32) vs model (64, 32)" in message


# --------------------------------------------------------------------------------------------------
# Training checkpoints to exports (the sharded FSDP folders are covered in tests/core/test_parallel.py)
# --------------------------------------------------------------------------------------------------

def _trained_checkpoint(tmp_path: Path):
    """A real Lightning checkpoint of a CausalLMModule after one optimizer step, and the module."""
    import lightning as L
    from torch.utils.data import DataLoader

    from core.training import CausalLMModule, OptimConfig

    config = ModelConfig(d_model=16, pattern="S*", vocab_size=32)
    config.mamba1.d_state = 4
    config.attention.n_heads = 2
    module = CausalLMModule(config, OptimConfig(warmup_steps=1, max_steps=1))
    ids = torch.randint(0, 32, (4, 9))
    data = [{"input_ids": row[:-1], "labels": row[1:]} for row in ids]
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(data, batch_size=4))
    path = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(path)
    return path, module


def test_consolidate_a_checkpoint_file_into_an_export(tmp_path: Path, capsys) -> None:
    path, module = _trained_checkpoint(tmp_path)
    state, info = ckpt.read_training_checkpoint(path)
    assert info["global_step"] == 1 and "optimizer_states" not in info and "model_config" in info["hyper_parameters"]
    assert set(state) == set(module.state_dict())

    like = save_export(module.model, tmp_path / "final", tokenizer_json=TOKENIZER, extra={"data": {"name": "x"}})
    ckpt.main(["consolidate", str(path), str(tmp_path / "export"), "--like", str(like)])
    assert "export written" in capsys.readouterr().out
    info = read_export_info(tmp_path / "export")
    assert info.extra["data"] == {"name": "x"} and info.extra["steps"] == 1 and info.tokenizer_path is not None
    loaded = load_export(tmp_path / "export")
    for name, tensor in module.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_consolidate_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.consolidate_checkpoint(tmp_path / "missing.ckpt", tmp_path / "export")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="no meta.pt"):
        ckpt.consolidate_checkpoint(tmp_path / "folder", tmp_path / "export")
    torch.save({"state_dict": {}, "hyper_parameters": {"spec": {}}, "global_step": 0}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a CausalLMModule checkpoint"):
        ckpt.consolidate_checkpoint(tmp_path / "other.ckpt", tmp_path / "export")
    torch.save({"weights": 1}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        ckpt.read_training_checkpoint(tmp_path / "plain.pt")
    assert not (tmp_path / "export").exists()
