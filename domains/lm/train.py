"""``python -m domains.lm train``: prepare the corpus, train a model, export it, print samples.

Everything a run writes goes under ``run.dir`` (default ``runs/lm/<model>-<data>``):
``config.yaml`` (the resolved config), ``checkpoints/`` (Lightning ``.ckpt`` for exact resume,
``last.ckpt`` included), ``logs/`` (CSV and TensorBoard), ``export/`` (``model.safetensors`` +
``config.json`` + ``tokenizer.json``, what ``eval`` and ``generate`` load).

Starting from trained weights: ``trainer.init_from=<path>`` (an export folder, a run folder, or a
Lightning ``.ckpt``) loads a checkpoint's weights into the model and trains with a fresh optimizer and
schedule (continued pretraining, context extension). The checkpoint must be of the same model (same
config up to the fields in :data:`MAY_DIFFER`) and, when it carries its tokenizer, of the same
tokenizer; anything else is refused with the differences listed. ``trainer.resume`` (exact resume of
an interrupted run) takes precedence: the ``.ckpt`` holds weights, optimizer and schedule.

Long sequences: ``loss_chunk_size=<n>`` sets the model config's ``loss_chunk_size``: CausalLM computes
the LM head and the cross-entropy over chunks of n positions (``core/chunked_loss.py``), so the
[seq_len, vocab] logits never exist at once; ``trainer.activation_checkpointing=true``
(``core/parallel.py``) recomputes each block in the backward.

Stages: a config with a non-empty ``stages`` list runs them in order, each a partial config merged on
top of the run's (``seq_len``, ``batch_size``, ``optim.*``, ``trainer.max_steps``, ...) with a ``name``;
stage i writes ``<run.dir>/<name>/`` and starts from stage i-1's export (the first one from
``trainer.init_from``, or from scratch when it is null). This is how context extension runs
(``configs/lm/experiment/context-extension-hybrid-130m.yaml``: 16K, then 32K, then 128K, as NVIDIA
extended its Mamba-2-Hybrid). With ``trainer.resume=last`` a rerun skips the stages that finished (their
export exists and their config is unchanged) and resumes the interrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

from core.checkpoint import (
    CONFIG_NAME,
    TOKENIZER_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_write,
    read_export_info,
    save_export,
    state_dict_problems,
)
from core.config import ModelConfig
from core.generate import generate
from core.presets import get_preset
from core.parallel import data_parallel_size
from core.training import (
    CausalLMModule,
    OptimConfig,
    ResumableSampler,
    build_trainer,
    checkpoint_step,
    gather_model,
    resume_path,
)
from domains.lm.data import PreparedData, prepare
from domains.lm.tokenizer import LMTokenizer


def model_config_from(cfg: DictConfig, vocab_size: int) -> ModelConfig:
    """The model group's preset with its overrides, sized to the tokenizer's vocabulary."""
    node = cfg.model.get("overrides")
    overrides: dict[str, Any] = OmegaConf.to_container(node, resolve=True) if node else {}  # type: ignore[assignment]
    config = get_preset(cfg.model.preset, **overrides)
    config.vocab_size = vocab_size
    config.domain = "lm"
    config.name = str(cfg.model.preset)
    chunk = loss_chunk_size(cfg)
    if chunk:
        if config.loss_chunk_size not in (None, chunk):
            raise ValueError(f"loss_chunk_size={chunk} and model.overrides.loss_chunk_size="
                             f"{config.loss_chunk_size} disagree; set one of them")
        config.loss_chunk_size = chunk
    longest = max(int(cfg.seq_len), eval_seq_len(cfg))
    if "H" in config.pattern and config.hyena.max_seqlen < longest:
        # Hyena's implicit filter is defined over max_seqlen positions (safari's l_max): it must cover
        # the training (and validation) length, as in safari, where l_max is the dataset's sequence length.
        config.hyena.max_seqlen = longest
    return config


def loss_chunk_size(cfg: DictConfig) -> int:
    """The run's ``loss_chunk_size`` (0 or null: all logits at once), checked."""
    value = cfg.get("loss_chunk_size")
    if isinstance(value, bool) or not isinstance(value, (int, type(None))):
        raise ValueError(f"loss_chunk_size must be an int >= 0 (0: all logits at once), got {value!r}")
    if value is not None and value < 0:
        raise ValueError(f"loss_chunk_size must be >= 0 (0: all logits at once), got {value}")
    return value or 0


def optim_config(cfg: DictConfig) -> OptimConfig:
    """The ``optim`` group as an OptimConfig (``max_steps`` from the trainer); unknown keys are errors."""
    values = dict(OmegaConf.to_container(cfg.optim, resolve=True))  # type: ignore[arg-type]
    known = {f.name for f in dataclasses.fields(OptimConfig)} - {"max_steps"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"optim: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return OptimConfig(**{**values, "max_steps": int(cfg.trainer.max_steps)})


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> None:
    text = OmegaConf.to_yaml(cfg, resolve=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", lambda tmp: tmp.write_text(text, encoding="utf-8"))


def data_loaders(cfg: DictConfig, data: PreparedData, start_step: int) -> tuple[DataLoader, DataLoader]:
    """Training windows (seeded by index, resumable at ``start_step``) and sequential validation windows."""
    steps = int(cfg.trainer.max_steps)
    batch = int(cfg.batch_size)
    world = data_parallel_size(cfg.trainer)
    train_set = data.train_dataset(seq_len=int(cfg.seq_len), num_samples=steps * batch * world, seed=int(cfg.run.seed))
    sampler = ResumableSampler(len(train_set), start=start_step * batch)
    workers = int(cfg.trainer.num_workers)
    train = DataLoader(train_set, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                       persistent_workers=workers > 0)
    val = DataLoader(data.eval_dataset("val", seq_len=eval_seq_len(cfg)), batch_size=batch, num_workers=workers)
    return train, val


def eval_seq_len(cfg: DictConfig) -> int:
    """The validation window: ``eval_seq_len``, or ``seq_len`` when it is null. A long-context run on a
    corpus whose val split is shorter than one training window validates on shorter windows."""
    value = cfg.get("eval_seq_len")
    length = int(cfg.seq_len) if value is None else int(value)
    if length < 1:
        raise ValueError(f"eval_seq_len must be >= 1 (or null: seq_len), got {value}")
    return length


# --------------------------------------------------------------------------------------------------
# Starting from a checkpoint's weights (trainer.init_from)
# --------------------------------------------------------------------------------------------------

# Config fields that may differ between the checkpoint and the new run: they change no parameter shape
# and are what a continued run legitimately changes (Hyena's filter length follows the training
# length; the SSD chunk is a kernel choice; the RoPE base is raised for long context; the MoE loss
# coefficients are training choices; so is the loss chunk). The name and the domain are labels.
MAY_DIFFER = ("name", "domain", "hyena.max_seqlen", "mamba2.chunk_size", "attention.rope_theta",
              "moe.load_balancing_coef", "moe.z_loss_coef", "moe.capacity_factor", "loss_chunk_size")


@dataclass
class InitSource:
    """What ``trainer.init_from`` names: the weights, their model config, and the tokenizer file if any."""

    path: Path
    kind: str  # "export" or "lightning checkpoint"
    state_dict: dict[str, torch.Tensor]
    config: ModelConfig
    tokenizer: Path | None


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_init_source(path: str | Path) -> InitSource:
    """Resolve ``trainer.init_from``: an export folder, a run folder (its ``export/``, else its
    ``checkpoints/last.ckpt``) or a Lightning ``.ckpt`` file of ``lm train``."""
    given = Path(path).expanduser()
    if given.is_dir():
        if (given / CONFIG_NAME).is_file():
            folder = given
        elif (given / "export" / CONFIG_NAME).is_file():
            folder = given / "export"
        elif (given / "checkpoints" / "last.ckpt").is_file():
            return read_init_source(given / "checkpoints" / "last.ckpt")
        else:
            raise FileNotFoundError(
                f"trainer.init_from={path}: the folder has no {CONFIG_NAME} (an export), no export/ and no "
                f"checkpoints/last.ckpt (a run folder); name an export folder, a run folder or a .ckpt file")
        info = read_export_info(folder)
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"trainer.init_from={path}: {folder} has no {WEIGHTS_NAME}")
        from safetensors.torch import load_file

        return InitSource(folder, "export", load_file(str(weights)), info.config, info.tokenizer_path)
    if given.is_file() and given.suffix == ".ckpt":
        checkpoint = torch.load(given, map_location="cpu", weights_only=False)
        try:
            model_config = checkpoint["hyper_parameters"]["model_config"]
            state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
        except (KeyError, TypeError) as error:
            raise CheckpointError(f"trainer.init_from={path}: not a Lightning checkpoint of lm train (no "
                                  f"{error} in it)") from error
        # The run folder's export, when there is one, carries the tokenizer the run used.
        tokenizer = given.parent.parent / "export" / TOKENIZER_NAME
        return InitSource(given, "lightning checkpoint", state, ModelConfig.from_dict(dict(model_config)),
                          tokenizer if tokenizer.is_file() else None)
    raise FileNotFoundError(f"trainer.init_from={path}: no such export folder, run folder or .ckpt file")


def init_from_checkpoint(model: torch.nn.Module, path: str | Path, tokenizer: LMTokenizer | None = None) -> InitSource:
    """Copy the weights of the checkpoint at ``path`` into ``model`` (a CausalLM), after checking that
    they are the same model and, when the checkpoint has one, the same tokenizer.

    Raises :class:`~core.checkpoint.CheckpointError` listing the differing config fields, or the
    missing / unexpected / mis-shaped weights.
    """
    source = read_init_source(path)
    ours, theirs = _flatten(model.config.to_dict()), _flatten(source.config.to_dict())
    differing = sorted(k for k in set(ours) | set(theirs)
                       if k not in MAY_DIFFER and ours.get(k, "<absent>") != theirs.get(k, "<absent>"))
    if differing:
        lines = [f"{k}: checkpoint {theirs.get(k, '<absent>')!r}, this run {ours.get(k, '<absent>')!r}"
                 for k in differing]
        raise CheckpointError(
            f"trainer.init_from={path}: the {source.kind} is a different model ({source.config.name or '?'}, "
            f"pattern {source.config.pattern!r}, d_model {source.config.d_model}) from the one this run builds "
            f"({model.config.name or '?'}, pattern {model.config.pattern!r}, d_model {model.config.d_model}):\n- "
            + "\n- ".join(lines)
            + "\nPick the model= preset (and model.overrides, data.vocab_size) the checkpoint was trained with.")
    problems = state_dict_problems(model, source.state_dict)
    if problems:
        raise CheckpointError(f"trainer.init_from={path}: the weights do not fit this model:\n- "
                              + "\n- ".join(problems))
    if tokenizer is not None and source.tokenizer is not None:
        try:
            theirs_sha = LMTokenizer.load(source.tokenizer, tokenizer.eot_token, tokenizer.pad_token).sha256
        except ValueError as error:
            raise CheckpointError(f"trainer.init_from={path}: its tokenizer does not fit this run's data "
                                  f"settings: {error}") from error
        if theirs_sha != tokenizer.sha256:
            raise CheckpointError(
                f"trainer.init_from={path}: the checkpoint was trained with another tokenizer "
                f"({source.tokenizer}, sha256 {theirs_sha[:12]}) than this run's data ({tokenizer.sha256[:12]}); "
                "token ids would mean other things. Use the data settings of the checkpoint's run "
                "(data.*, data.vocab_size), or data.tokenizer=<its tokenizer.json>.")
    with torch.no_grad():
        model.load_state_dict(source.state_dict, strict=False)  # strictness checked above (tied aliases aside)
    return source


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------

def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job, or its ``stages`` in order; returns the final metrics (val loss / ppl / bpb
    and the unigram baseline; with stages, the last stage's, plus ``stages``: every stage's)."""
    if cfg.get("stages"):
        return train_stages(cfg)
    return train_run(cfg)


def train_run(cfg: DictConfig) -> dict[str, Any]:
    """One training job (no stages)."""
    run_dir = Path(cfg.run.dir)
    L.seed_everything(int(cfg.run.seed), workers=True)
    data_cfg = dict(OmegaConf.to_container(cfg.data, resolve=True))  # type: ignore[arg-type]
    data_cfg["seq_len"] = int(cfg.seq_len)
    data = prepare(data_cfg)
    model_config = model_config_from(cfg, data.vocab_size)
    optim = optim_config(cfg)
    save_resolved_config(cfg, run_dir)

    unigram = data.unigram_baseline("val")
    print(f"data: {data.describe()}")
    print(f"unigram baseline on val: ppl {unigram.perplexity:.1f} ({unigram.bits_per_byte:.3f} bits/byte)")

    ckpt = resume_path(cfg.trainer.resume, run_dir)
    module = CausalLMModule(model_config, optim)
    n_params = sum(p.numel() for p in module.model.parameters())
    chunked = f", loss over chunks of {model_config.loss_chunk_size} positions" if model_config.loss_chunk_size else ""
    print(f"model: {model_config.name} pattern {model_config.pattern!r} d_model {model_config.d_model}, "
          f"{n_params:,} parameters{chunked}")
    init_from = cfg.trainer.get("init_from")
    if init_from and ckpt is None:
        source = init_from_checkpoint(module.model, init_from, data.tokenizer)
        print(f"init: weights from the {source.kind} {source.path} (fresh optimizer and schedule)")
    elif init_from:
        print(f"init: resuming {ckpt}; trainer.init_from={init_from} is not used (the checkpoint holds the weights)")
    train_loader, val_loader = data_loaders(cfg, data, checkpoint_step(ckpt))
    trainer = build_trainer(cfg.trainer, run_dir)
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt)
    elapsed = time.perf_counter() - started

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    val_loss = trainer.validate(module, dataloaders=val_loader, verbose=False)[0]["val/loss"]
    result = {
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "val_bits_per_byte": data.bits_per_byte(val_loss, "val"),
        "unigram_ppl": unigram.perplexity,
        "train_seconds": elapsed,
        "tokens_per_s": metrics.get("train/tokens_per_s", float("nan")),
        "steps": trainer.global_step,
    }
    # Under FSDP the weights are shards: every rank takes part in the gather, rank 0 gets the model.
    model = gather_model(trainer, module.model)
    if trainer.is_global_zero:
        export_dir = save_export(model, run_dir / "export", tokenizer_json=data.tokenizer.hf.to_str(),
                                 extra={"data": data_cfg, "seq_len": int(cfg.seq_len), "steps": trainer.global_step,
                                        "val_loss": val_loss, "init_from": str(init_from) if init_from else None})
        print(f"\nval ppl {result['val_ppl']:.2f} (unigram {unigram.perplexity:.1f}), "
              f"{result['val_bits_per_byte']:.3f} bits/byte, after {trainer.global_step} steps in {elapsed:.0f} s")
        print(f"export: {export_dir}   checkpoints: {run_dir / 'checkpoints'}")
        print_samples(model, data, cfg.samples)
    return result


# --------------------------------------------------------------------------------------------------
# Stages (context extension)
# --------------------------------------------------------------------------------------------------

def stage_configs(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(name, full config) of each stage: the run's config without ``stages``, the stage's keys merged
    on top, ``run.dir`` = ``<run.dir>/<name>``. Unknown keys in a stage are errors (as on the command
    line); ``trainer.init_from`` is filled by :func:`train_stages`."""
    stages = cfg.stages
    if not OmegaConf.is_list(stages) and not isinstance(stages, list):
        raise ValueError(f"stages must be a list of mappings (each with a name), got {type(stages).__name__}")
    base = cfg.copy()
    with open_dict(base):
        base.stages = []
    base_dir = Path(str(cfg.run.dir))
    out: list[tuple[str, DictConfig]] = []
    for i, stage in enumerate(stages):
        if not OmegaConf.is_dict(stage) and not isinstance(stage, dict):
            raise ValueError(f"stages[{i}] must be a mapping with a name and config keys, got {stage!r}")
        stage = OmegaConf.to_container(stage, resolve=True) if OmegaConf.is_dict(stage) else dict(stage)
        name = str(stage.pop("name", "") or "")
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"stages[{i}] needs a name that is a folder name (it names <run.dir>/<name>), got "
                             f"{name!r}")
        if name in [n for n, _ in out]:
            raise ValueError(f"stages[{i}]: the name {name!r} is used twice")
        if "stages" in stage or "run" in stage:
            raise ValueError(f"stages[{i}] ({name}) may not set 'stages' or 'run' (each stage writes <run.dir>/{name})")
        try:
            stage_cfg = OmegaConf.merge(base, stage)
        except Exception as error:  # omegaconf's ConfigKeyError / ValidationError
            raise ValueError(f"stages[{i}] ({name}): {error}") from error
        assert isinstance(stage_cfg, DictConfig)
        stage_cfg.run.dir = str(base_dir / name)
        out.append((name, stage_cfg))
    return out


def _same_config(done: Path, cfg: DictConfig) -> bool:
    """Whether the stage folder ``done`` was written by this stage config (``trainer.resume`` aside)."""
    saved = done / "config.yaml"
    if not saved.is_file():
        return False
    old = OmegaConf.load(saved)
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for c in (old, new):
        with open_dict(c):
            c.trainer.resume = None
    return OmegaConf.to_yaml(old) == OmegaConf.to_yaml(new)


def train_stages(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.stages`` in order, each starting from the previous stage's export (module docstring)."""
    stages = stage_configs(cfg)
    resume = cfg.trainer.get("resume")
    previous = cfg.trainer.get("init_from")
    results: dict[str, Any] = {}
    for i, (name, stage_cfg) in enumerate(stages):
        run_dir = Path(stage_cfg.run.dir)
        stage_cfg.trainer.init_from = str(previous) if previous else None
        export = run_dir / "export"
        stage_cfg.trainer.resume = None
        if resume == "last":
            if (export / CONFIG_NAME).is_file():
                if not _same_config(run_dir, stage_cfg):
                    raise ValueError(f"stage {name}: {run_dir} holds a finished stage run with another config; "
                                     "resume with the config it was run with, or use another run.name")
                print(f"\n=== stage {i + 1}/{len(stages)} {name}: done earlier ({export}), skipped ===")
                results[name] = {"skipped": True, "export": str(export)}
                previous = export
                continue
            if (run_dir / "checkpoints" / "last.ckpt").is_file():
                stage_cfg.trainer.resume = "last"
        elif resume not in (None, "", "none", "null"):
            raise ValueError(f"trainer.resume={resume}: with stages only 'last' (per stage) is meaningful")
        print(f"\n=== stage {i + 1}/{len(stages)} {name}: seq_len {stage_cfg.seq_len}, batch {stage_cfg.batch_size}, "
              f"{stage_cfg.trainer.max_steps} steps, lr {stage_cfg.optim.lr}, from "
              f"{previous or 'scratch'} -> {run_dir} ===")
        results[name] = train_run(stage_cfg)
        results[name]["export"] = str(export)
        previous = export
    last = dict(results[stages[-1][0]])
    last["stages"] = results
    return last


def print_samples(model: torch.nn.Module, data: PreparedData, samples: DictConfig) -> None:
    prompts = list(samples.prompts)
    if not prompts:
        return
    ids = [data.tokenizer.encode(p) or [data.eot_id] for p in prompts]
    out = generate(model, ids, max_new_tokens=int(samples.max_new_tokens), temperature=float(samples.temperature),
                   top_p=float(samples.top_p), seed=0, stop_tokens=[data.eot_id], pad_token_id=data.pad_id)
    for prompt, continuation in zip(prompts, out.sequences()):
        text = data.tokenizer.decode([t for t in continuation if t != data.eot_id])
        print(f"\n--- sample ---\n{prompt}{text}")
