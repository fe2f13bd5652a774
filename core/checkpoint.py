"""Checkpoints: our export format, and one loader for every folder layout we read.

An export is a folder of three files, each written under a temporary name in the same folder and
renamed over the old one (``os.replace``), so an interrupted save never leaves a half-written file:

    model.safetensors   the state dict, each tensor once (the tied ``lm_head.weight`` is the embedding
                        and is left out, as safetensors forbids shared tensors)
    config.json         ``ModelConfig.to_dict()`` plus ``"format": "ssm-suite"``, ``"format_version": 1``
                        (and ``"extra"``: the caller's JSON metadata, when given); written last
    tokenizer.json      optional: a ``tokenizers`` tokenizer

:func:`load_pretrained` reads a local folder in any of the layouts we know, detected from its
config.json, and downloads nothing:

- our export (``"format": "ssm-suite"``);
- HF transformers (``"model_type"`` mamba / mamba2 / jamba / llama) with ``model.safetensors``, sharded
  safetensors (``model.safetensors.index.json``) or ``pytorch_model.bin`` (sharded or not);
- mamba_ssm's ``MambaLMHeadModel`` (``d_model``, ``n_layer``, ``ssm_cfg``, ...) with ``pytorch_model.bin``.

The mappings of the foreign layouts live in :mod:`core.convert_hf`.

Training checkpoints (Lightning ``.ckpt`` files, and the folders of shards that FSDP runs write) become
exports with :func:`consolidate_checkpoint`, also a command:

    python -m core.checkpoint consolidate <checkpoint file or folder> <export folder> [--like <export>]
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.backbone import CausalLM
from core.config import ModelConfig

FORMAT = "ssm-suite"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
_FORMAT_KEYS = ("format", "format_version", "extra")


class CheckpointError(ValueError):
    """A folder or state dict that does not hold the expected model (the message says what differs)."""


# --------------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------------

def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create or replace ``path`` atomically: ``write(tmp)`` fills a temporary file next to it, which is
    flushed to disk and renamed over ``path``. On any error the temporary file is removed and ``path``
    keeps its old content (or stays absent)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def replace_folder(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the complete folder ``tmp`` to ``final`` (replacing an old one) with renames only.

    os.replace cannot overwrite a non-empty folder, so an old one is moved aside first: a crash between
    the two renames leaves no folder under ``final`` (rebuilt next time), never a mixed one. Both must
    be on one filesystem (``tmp`` beside ``final``).
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        stale = final.with_name(f".{final.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    return atomic_write(path, write)


# --------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------

def _tensor_identity(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tensor.stride(), tensor.dtype)


def alias_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Keys whose tensor *is* an earlier key's (tied weights): ``{alias: first key}``."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for key, tensor in state_dict.items():
        identity = _tensor_identity(tensor)
        if identity in first:
            aliases[key] = first[identity]
        else:
            first[identity] = key
    return aliases


def state_dict_problems(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """How ``state_dict`` differs from ``model``'s (tied aliases may be absent): missing keys,
    unexpected keys and shape mismatches, one line each kind (empty: it fits)."""
    expected = model.state_dict()
    aliases = alias_keys(expected)
    missing = [k for k in expected if k not in state_dict and k not in aliases]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = "; ".join(items[:10]) + (f"; ... ({len(items)} in all)" if len(items) > 10 else "")
            problems.append(f"{label}: {shown}")
    return problems


def build_model(config: ModelConfig, state_dict: Mapping[str, torch.Tensor],
                device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                source: str = "checkpoint") -> CausalLM:
    """A :class:`CausalLM` for ``config`` holding ``state_dict`` (tied aliases may be absent).

    The model is built on ``device`` (default CPU) in ``dtype`` (default: the dtype of the state dict's
    embedding); the mixers keep their float32 parameters (A_log, D, ...) as they always do, and every
    tensor is copied in with a cast. Raises :class:`CheckpointError` naming the missing / unexpected /
    mis-shaped keys when the state dict is not this model's.
    """
    if dtype is None:
        embedding = state_dict.get("backbone.embedding.weight")
        dtype = embedding.dtype if embedding is not None and embedding.is_floating_point() else torch.float32
    try:
        model = CausalLM(config, device=device, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: its config does not describe a valid model: {error}") from error
    problems = state_dict_problems(model, state_dict)
    if problems:
        raise CheckpointError(
            f"{source}: the weights do not match the model its config describes (a checkpoint of another "
            f"model, or a config edited after saving):\n- " + "\n- ".join(problems)
        )
    with torch.no_grad():
        model.load_state_dict(dict(state_dict), strict=False)  # strictness checked above (aliases aside)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Our export
# --------------------------------------------------------------------------------------------------

@dataclass
class ExportInfo:
    """What an export folder holds besides the weights."""

    folder: Path
    config: ModelConfig
    format_version: int
    extra: dict[str, Any] = field(default_factory=dict)
    tokenizer_path: Path | None = None


def save_export(model: CausalLM, folder: str | os.PathLike, tokenizer_json: str | None = None,
                extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as an export folder (created if needed; files of an older export replaced).

    tokenizer_json: the tokenizer as JSON text (``tokenizers.Tokenizer.to_str()``) or the path of a
                    tokenizer.json file; stored as ``tokenizer.json``.
    extra:          JSON-serializable metadata (training step, data, ...), stored under
                    ``"extra"`` in config.json.

    Returns the folder. Everything is validated before the first file is written.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"save_export needs a CausalLM (with a ModelConfig .config), got {type(model).__name__}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"save_export: {folder} exists and is not a folder")

    state = model.state_dict()
    aliases = alias_keys(state)
    tensors = {}
    for key, tensor in state.items():
        if key in aliases:
            continue
        if tensor.device.type == "meta":
            raise ValueError(f"save_export: {key} is on the meta device (no data); materialize the model first")
        tensors[key] = tensor.detach().to("cpu").contiguous()

    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **config.to_dict()}  # domain: in to_dict
    if extra is not None:
        if not isinstance(extra, dict):
            raise TypeError(f"save_export: extra must be a dict, got {type(extra).__name__}")
        meta["extra"] = extra
    try:
        config_text = json.dumps(meta, indent=2, sort_keys=False) + "\n"
    except (TypeError, ValueError) as error:
        raise ValueError(f"save_export: extra is not JSON-serializable: {error}") from error
    tokenizer_text = _tokenizer_text(tokenizer_json) if tokenizer_json is not None else None

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS_NAME,
                 lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", "producer": FORMAT}))
    if tokenizer_text is not None:
        _write_text(folder / TOKENIZER_NAME, tokenizer_text)
    # Last, so that a folder whose config.json is new has the new weights too.
    _write_text(folder / CONFIG_NAME, config_text)
    return folder


def _tokenizer_text(tokenizer_json: str) -> str:
    text = tokenizer_json
    if not text.lstrip().startswith("{"):
        path = Path(tokenizer_json)
        if not path.is_file():
            raise ValueError("save_export: tokenizer_json must be the tokenizer's JSON text "
                             f"(tokenizer.to_str()) or the path of a tokenizer.json; {tokenizer_json[:80]!r} "
                             "is neither")
        text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"save_export: tokenizer_json is not valid JSON: {error}") from error
    return text


def _require_folder(folder: Path, what: str) -> None:
    if not folder.exists():
        raise FileNotFoundError(f"{what}: folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{what}: {folder} is not a folder")


def _listing(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names) if names else "nothing"


def _read_config_json(folder: Path, what: str) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {folder} has no {CONFIG_NAME} (it holds: {_listing(folder)})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{what}: {path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path} holds a {type(data).__name__}, not a JSON object")
    return data


def read_export_info(folder: str | os.PathLike) -> ExportInfo:
    """The config, extra metadata and tokenizer path of an export folder (no weights read)."""
    folder = Path(folder)
    what = "load_export"
    _require_folder(folder, what)
    data = _read_config_json(folder, what)
    fmt = data.get("format")
    if fmt != FORMAT:
        if "model_type" in data or "d_model" in data:
            kind = f"an HF {data['model_type']!r}" if "model_type" in data else "a mamba_ssm"
            raise CheckpointError(f"{what}: {folder} is {kind} checkpoint, not an {FORMAT} export; load it with "
                                  "core.checkpoint.load_pretrained")
        raise CheckpointError(f"{what}: {folder / CONFIG_NAME} is not an {FORMAT} export (format={fmt!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{what}: {folder / CONFIG_NAME} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{what}: {folder} has format_version {version}, written by a newer ssm-suite; "
                              f"this one reads up to {FORMAT_VERSION}: upgrade ssm-suite")
    model_dict = {k: v for k, v in data.items() if k not in _FORMAT_KEYS}
    try:
        config = ModelConfig.from_dict(model_dict)
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"{what}: {folder / CONFIG_NAME} is not a config of this model family: {error}"
        ) from error
    tokenizer = folder / TOKENIZER_NAME
    return ExportInfo(folder=folder, config=config, format_version=version, extra=data.get("extra") or {},
                      tokenizer_path=tokenizer if tokenizer.is_file() else None)


def load_export(folder: str | os.PathLike, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> CausalLM:
    """The :class:`CausalLM` of an export folder (see :func:`save_export`), in eval mode.

    device defaults to CPU, dtype to the dtype the model was saved in. Errors name the problem: a
    missing folder or file, a config.json of another format or model family (unknown keys), weights
    that do not fit the config (missing / unexpected keys, shape mismatches).
    """
    info = read_export_info(folder)
    weights = info.folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"load_export: {info.folder} has no {WEIGHTS_NAME} (it holds: {_listing(info.folder)})")
    state = load_file(str(weights))
    return build_model(info.config, state, device=device, dtype=dtype, source=f"export {info.folder}")


# --------------------------------------------------------------------------------------------------
# Any local folder
# --------------------------------------------------------------------------------------------------

def detect_layout(folder: str | os.PathLike) -> str:
    """Which layout a checkpoint folder has: ``"export"``, ``"hf"`` or ``"mamba_ssm"``."""
    from core.convert_hf import is_mamba_ssm_config

    folder = Path(folder)
    what = "load_pretrained"
    _require_folder(folder, what)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{what}: {folder} has no {CONFIG_NAME}, so it is none of the layouts we read (an {FORMAT} "
            "export, an HF transformers folder, a mamba_ssm folder); it holds: " + _listing(folder)
        )
    data = _read_config_json(folder, what)
    if "format" in data:
        if data["format"] != FORMAT:
            raise CheckpointError(f"{what}: {folder / CONFIG_NAME} has an unknown format {data['format']!r}")
        return "export"
    if "model_type" in data:
        return "hf"
    if is_mamba_ssm_config(data):
        return "mamba_ssm"
    raise CheckpointError(
        f"{what}: {folder / CONFIG_NAME} is none of the layouts we read: no 'format' ({FORMAT} export), no "
        "'model_type' (HF transformers), no 'd_model' / 'n_layer' (mamba_ssm); keys: " + ", ".join(sorted(data))
    )


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an HF / mamba_ssm folder, on CPU: model.safetensors, sharded safetensors
    (model.safetensors.index.json), pytorch_model.bin, or sharded .bin (pytorch_model.bin.index.json).
    ``.bin`` files are read with ``torch.load(weights_only=True)``: tensors only, no code."""
    folder = Path(folder)
    for index_name, loader in (("model.safetensors.index.json", _load_safetensors),
                               ("pytorch_model.bin.index.json", _load_bin)):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise FileNotFoundError(f"{index} names shard {shard}, which {folder} lacks")
                state.update(loader(folder / shard))
            missing = sorted(set(weight_map) - set(state))
            if missing:
                raise CheckpointError(f"{index} lists tensors its shards lack: {missing[:10]}")
            return state
    if (folder / WEIGHTS_NAME).is_file():
        return _load_safetensors(folder / WEIGHTS_NAME)
    if (folder / "pytorch_model.bin").is_file():
        return _load_bin(folder / "pytorch_model.bin")
    raise FileNotFoundError(
        f"{folder} has no weights: expected model.safetensors, model.safetensors.index.json, pytorch_model.bin "
        f"or pytorch_model.bin.index.json (it holds: {_listing(folder)})"
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path), device="cpu")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def load_pretrained(folder: str | os.PathLike, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> CausalLM:
    """The :class:`CausalLM` of a local checkpoint folder: our export, an HF transformers folder
    (MambaForCausalLM, Mamba2ForCausalLM, JambaForCausalLM, LlamaForCausalLM) or a mamba_ssm folder;
    the layout is detected from config.json (see :func:`detect_layout`). Nothing is downloaded.

    device defaults to CPU, dtype to the checkpoint's. Models that our mixers cannot express raise
    :class:`core.convert_hf.ConversionError` naming the option.
    """
    from core.convert_hf import (
        config_from_hf,
        config_from_mamba_ssm,
        state_dict_from_hf,
        state_dict_from_mamba_ssm,
    )

    layout = detect_layout(folder)
    if layout == "export":
        return load_export(folder, device=device, dtype=dtype)
    folder = Path(folder)
    data = _read_config_json(folder, "load_pretrained")
    if layout == "hf":
        config = config_from_hf(data)
        state = state_dict_from_hf(data, read_weights(folder), config)
        source = f"HF {data['model_type']} checkpoint {folder}"
    else:
        config = config_from_mamba_ssm(data)
        state = state_dict_from_mamba_ssm(data, read_weights(folder), config)
        source = f"mamba_ssm checkpoint {folder}"
    return build_model(config, state, device=device, dtype=dtype, source=source)


# --------------------------------------------------------------------------------------------------
# Training checkpoints (Lightning .ckpt files and sharded FSDP folders) to exports
# --------------------------------------------------------------------------------------------------

SHARDED_META_NAME = "meta.pt"  # what Lightning writes next to the shards of a sharded checkpoint


def read_training_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LightningModule's full state dict (CPU tensors, keys as ``module.state_dict()``) and the rest of
    a Lightning checkpoint (``global_step``, ``hyper_parameters``, ...; no optimizer state).

    ``path`` is a ``.ckpt`` file (single device, DDP, FSDP with ``state_dict_type=full``) or the folder
    of a sharded FSDP checkpoint: the shards of any number of ranks are read and assembled into whole
    tensors in this one process (torch.distributed.checkpoint reshards on load; no process group is
    needed), reading only the model's entries, not the optimizer's.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"read_training_checkpoint: no checkpoint at {path}")
    # weights_only=False: a Lightning checkpoint of our own runs holds loop and callback state (plain
    # Python objects); never point this at files of unknown origin.
    if path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
        state = checkpoint.pop("state_dict")
        checkpoint.pop("optimizer_states", None)
        return state, checkpoint
    meta = path / SHARDED_META_NAME
    if not meta.is_file():
        raise CheckpointError(f"{path} is a folder but not a sharded Lightning checkpoint (no {SHARDED_META_NAME}; "
                              f"it holds: {_listing(path)})")
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(path))
    entries = reader.read_metadata().state_dict_metadata
    # Lightning saves {"model": module state dict, "optimizer_0": ...}; DCP flattens the keys to
    # "model.<module key>". Allocating whole tensors for the model entries only and loading into them
    # gathers every rank's shard of each.
    template = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
                for key, entry in entries.items()
                if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)}
    if not template:
        raise CheckpointError(f"{path}: the sharded checkpoint holds no model tensors")
    import warnings

    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent here
        warnings.simplefilter("ignore", UserWarning)
        dcp_load(template, storage_reader=reader)
    state = {key[len("model."):]: tensor for key, tensor in template.items()}
    info = torch.load(meta, map_location="cpu", weights_only=False)
    return state, info


def consolidate_checkpoint(checkpoint: str | os.PathLike, folder: str | os.PathLike,
                           tokenizer_json: str | None = None, like: str | os.PathLike | None = None,
                           prefix: str = "model.") -> Path:
    """Write an export (see :func:`save_export`) from a training checkpoint of a
    :class:`core.training.CausalLMModule`: a ``.ckpt`` file or a sharded FSDP folder saved on any number
    of devices. The model config comes from the checkpoint's hyper-parameters.

    tokenizer_json: a tokenizer.json to include; like: an export folder of the same run whose
                    tokenizer.json and ``extra`` metadata (data settings that eval / generate read) are
                    carried over. ``extra`` also records the checkpoint and its step.
    """
    state, info = read_training_checkpoint(checkpoint)
    hyper = info.get("hyper_parameters") or {}
    if "model_config" not in hyper:
        raise CheckpointError(
            f"{checkpoint}: not a CausalLMModule checkpoint (its hyper-parameters are {sorted(hyper)}, no "
            "model_config); read it with read_training_checkpoint and write the domain's own export"
        )
    config = ModelConfig.from_dict(dict(hyper["model_config"]))
    model_state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    model = build_model(config, model_state, source=f"checkpoint {checkpoint}")
    extra: dict[str, Any] = {}
    if like is not None:
        reference = read_export_info(like)
        extra = dict(reference.extra)
        if tokenizer_json is None and reference.tokenizer_path is not None:
            tokenizer_json = str(reference.tokenizer_path)
    extra.update({"checkpoint": str(Path(checkpoint).resolve()), "steps": info.get("global_step")})
    return save_export(model, folder, tokenizer_json=tokenizer_json, extra=extra)


def main(argv: list[str] | None = None) -> None:
    """``python -m core.checkpoint consolidate <checkpoint> <export folder> [--tokenizer F] [--like EXPORT]``"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m core.checkpoint",
                                     description="Checkpoint tools of ssm-suite.")
    commands = parser.add_subparsers(dest="command", required=True)
    consolidate = commands.add_parser(
        "consolidate", help="write an export (what eval / generate load) from a training checkpoint: a .ckpt "
                            "file or a sharded FSDP checkpoint folder saved on any number of devices")
    consolidate.add_argument("checkpoint", help="e.g. runs/lm/<run>/checkpoints/last.ckpt (file or folder)")
    consolidate.add_argument("folder", help="the export folder to write")
    consolidate.add_argument("--tokenizer", help="a tokenizer.json to include")
    consolidate.add_argument("--like", help="an export of the same run: copy its tokenizer and metadata")
    args = parser.parse_args(argv)
    folder = consolidate_checkpoint(args.checkpoint, args.folder, tokenizer_json=args.tokenizer, like=args.like)
    print(f"export written to {folder}")


if __name__ == "__main__":
    main()
