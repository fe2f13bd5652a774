"""``python -m domains.dna finetune task=species|coding``: classify windows, report test accuracy.

- ``task=species``: which of the alignment's species (Hsap, Ptro, Ggor, Ppyg) a window of
  ``task.window`` bases comes from. Splits are alignment-column intervals shared by all species
  (:mod:`domains.dna.data`), so no test window's homologue is trained on; classes are balanced.
- ``task=coding``: U. maydis windows whose label span lies entirely in CDS (coding) or outside every
  annotated feature (intergenic), from the genome's GFF3; balanced.

``pretrained=<pretrain run or export>`` starts every backbone from its weights and takes its model
config and tokenizer (a tokenizer.k that differs is an error); without it the ``model`` group's preset
trains from scratch. ``head.mode``: ``causal``, ``bidirectional`` or ``rc`` (reverse-complement
equivariant; see :mod:`core.bidirectional`). Writes under ``run.dir``: ``config.yaml``,
``checkpoints/``, ``logs/``, ``classifier/`` (``model.safetensors`` + ``config.json``) and
``results.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from core.checkpoint import alias_keys, atomic_write, load_export, read_export_info
from core.classification import ClassifierConfig, ClassifierModule, SequenceClassifier
from core.config import ModelConfig
from core.pattern import HYENA
from core.parallel import data_parallel_size
from core.training import ResumableSampler, build_trainer, checkpoint_step, full_state_dict, resume_path
from domains.dna.data import ClassWindows, DNAData, coding_starts, load_annotation, species_starts
from domains.dna.evaluate import checkpoint_tokenizer, export_folder
from domains.dna.pretrain import model_config_from, optim_config, save_resolved_config
from domains.dna.tokenizer import DNATokenizer

TASKS = ("species", "coding")


def class_starts(task: DictConfig, data: DNAData, split: str, annotation: Any) -> tuple[list[str], list]:
    window = int(task.window)
    if task.name == "species":
        return data.genome.track_names, species_starts(data, split, window)
    if task.name == "coding":
        return ["intergenic", "coding"], coding_starts(data, annotation, split, window, task.label_span)
    raise ValueError(f"task.name={task.name!r} unknown; tasks: {TASKS}")


def save_classifier(folder: Path, module: ClassifierModule, extra: dict[str, Any],
                    state_dict: dict[str, Any] | None = None) -> Path:
    """The classifier's weights (safetensors; each shared tensor once, e.g. Hyena's sine frequencies) and
    config (JSON: model, head, rc_map and ``extra``), each written atomically; read by :func:`load_classifier`.
    ``state_dict``: the full weights when ``module``'s are FSDP shards (see ``core.training.full_state_dict``)."""
    folder.mkdir(parents=True, exist_ok=True)
    full = module.model.state_dict() if state_dict is None else state_dict
    aliases = alias_keys(full)
    state = {k: v.detach().cpu().contiguous() for k, v in full.items() if k not in aliases}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
    meta = {"format": "ssm-suite-classifier", "model": module.model.config.to_dict(),
            "head": asdict(module.model.head_config), "rc_map": module.hparams.get("rc_map"), **extra}
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return folder


def load_classifier(folder: str | Path) -> SequenceClassifier:
    """The :class:`SequenceClassifier` that :func:`save_classifier` wrote, in eval mode."""
    folder = Path(folder)
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if meta.get("format") != "ssm-suite-classifier":
        raise ValueError(f"{folder / 'config.json'} is not a classifier written by `python -m domains.dna finetune`")
    rc = meta.get("rc_map")
    model = SequenceClassifier(ModelConfig.from_dict(meta["model"]), ClassifierConfig(**meta["head"]),
                               rc_map=None if rc is None else torch.tensor(rc))
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    shared = set(alias_keys(model.state_dict()))
    if unexpected or set(missing) - shared:
        raise ValueError(f"{folder}: the weights do not fit the saved config (missing {sorted(set(missing) - shared)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    return model.eval()


def finetune(cfg: DictConfig) -> dict[str, Any]:
    run_dir = Path(cfg.run.dir)
    L.seed_everything(int(cfg.run.seed), workers=True)
    task = cfg.task
    window = int(task.window)
    data = DNAData(dict(OmegaConf.to_container(cfg.data, resolve=True)))  # type: ignore[arg-type]
    tokenizer = DNATokenizer(int(cfg.tokenizer.k))
    if window % tokenizer.k:
        raise ValueError(f"task.window={window} is not a multiple of tokenizer.k={tokenizer.k}")
    tokens = window // tokenizer.k

    pretrained_state = None
    if cfg.pretrained:
        folder = export_folder(cfg.pretrained)
        checkpoint_tokenizer(folder, tokenizer.k)  # a mismatch is an error naming both
        model_config = read_export_info(folder).config
        if HYENA in model_config.pattern and tokens > model_config.hyena.max_seqlen:
            raise ValueError(f"task.window={window} bases = {tokens} tokens exceeds the pretrained Hyena's filter "
                             f"length {model_config.hyena.max_seqlen}; use a window <= "
                             f"{model_config.hyena.max_seqlen * tokenizer.k} or pretrain at that length")
        pretrained_state = load_export(folder).state_dict()
        print(f"pretrained: {folder} ({model_config.name})")
    else:
        model_config = model_config_from(cfg, tokenizer, tokens)

    annotation = load_annotation(data) if task.name == "coding" else None
    classes, train_starts = class_starts(task, data, "train", annotation)
    _, val_starts = class_starts(task, data, "val", annotation)
    _, test_starts = class_starts(task, data, "test", annotation)
    steps, batch = int(cfg.trainer.max_steps), int(cfg.batch_size)
    max_n = data.settings.max_n_fraction
    train_set = ClassWindows(data.genome, train_starts, tokenizer, window, max_n,
                             num_samples=steps * batch * data_parallel_size(cfg.trainer),
                             seed=int(cfg.run.seed), rc_prob=float(cfg.rc_prob))
    per_class = int(cfg.eval_per_class)
    val_set = ClassWindows(data.genome, val_starts, tokenizer, window, max_n, per_class=per_class)
    test_set = ClassWindows(data.genome, test_starts, tokenizer, window, max_n, per_class=per_class)
    save_resolved_config(cfg, run_dir)
    print(f"data: {data.describe()}")
    print(f"task {task.name}: classes {classes}, windows of {window:,} bases; {len(val_set)} val and "
          f"{len(test_set)} test windows")

    head = ClassifierConfig(n_classes=len(classes), **OmegaConf.to_container(cfg.head, resolve=True))  # type: ignore[arg-type]
    rc_map = tokenizer.rc_map().tolist() if head.mode == "rc" else None
    module = ClassifierModule(model_config, head, optim_config(cfg), rc_map=rc_map)
    if pretrained_state is not None:
        module.model.load_backbone(pretrained_state)
    n_params = sum(p.numel() for p in module.model.parameters())
    print(f"model: {model_config.name} pattern {model_config.pattern!r}, head {head.mode}/{head.pooling}, "
          f"{n_params:,} parameters")

    ckpt = resume_path(cfg.trainer.resume, run_dir)
    workers = int(cfg.trainer.num_workers)
    train_loader = DataLoader(train_set, batch_size=batch, num_workers=workers, drop_last=True,
                              sampler=ResumableSampler(len(train_set), start=checkpoint_step(ckpt) * batch),
                              persistent_workers=workers > 0)
    val_loader = DataLoader(val_set, batch_size=batch, num_workers=workers)
    test_loader = DataLoader(test_set, batch_size=batch, num_workers=workers)
    trainer = build_trainer(cfg.trainer, run_dir)
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt)
    elapsed = time.perf_counter() - started
    test = trainer.test(module, dataloaders=test_loader, verbose=False)[0]
    result = {"task": str(task.name), "window": window, "classes": list(classes), "mode": head.mode,
              "pretrained": str(cfg.pretrained) if cfg.pretrained else None, "steps": trainer.global_step,
              "train_seconds": elapsed, "test_acc": float(test["test/acc"]), "test_loss": float(test["test/loss"]),
              "test_windows": len(test_set), "chance": 1.0 / len(classes), "parameters": n_params}
    state = full_state_dict(trainer, module.model)  # every rank: under FSDP this gathers the shards
    if trainer.is_global_zero:
        save_classifier(run_dir / "classifier", module,
                        {"task": OmegaConf.to_container(task, resolve=True), "classes": list(classes),
                         "tokenizer": tokenizer.to_dict(), "data": data.settings.to_dict()}, state_dict=state)
        text = json.dumps(result, indent=2) + "\n"
        atomic_write(run_dir / "results.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
        print(f"\ntest accuracy {result['test_acc']:.3f} on {len(test_set)} windows (chance {result['chance']:.3f}) "
              f"after {trainer.global_step} steps in {elapsed:.0f} s")
    return result
