"""``python -m domains.lm <command> [key=value ...]``: the language domain's CLI.

Commands (configs under ``configs/lm/``):
    train     prepare the corpus (if needed), train, export, print samples
    prepare   tokenize a corpus into packed shards (train does this itself)
    eval      perplexity and bits per byte of an export on a split
    generate  sample continuations of prompts from an export
    task      train a model on a synthetic recall task and print its accuracy per setting
    probe     long-context probes of an export (needle in a haystack, variable tracking, ppl by position)
    sweep     a scaling-law sweep (sweep=<name>: configs/lm/sweep/), one train run a point, as a Hydra multirun
    sweep report (or sweep-report)  the sweep's table, power-law fits and plots
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from core.cli import run_command


def _train(cfg: DictConfig) -> None:
    from domains.lm.train import train

    train(cfg)


def _prepare(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    from domains.lm.data import prepare

    data = prepare(OmegaConf.to_container(cfg.data, resolve=True))
    print(data.describe())


def _eval(cfg: DictConfig) -> None:
    from domains.lm.evaluate import evaluate

    evaluate(cfg)


def _generate(cfg: DictConfig) -> None:
    from domains.lm.sample import sample

    sample(cfg)


def _task(cfg: DictConfig) -> None:
    from domains.lm.tasks import run_task

    run_task(cfg)


def _probe(cfg: DictConfig) -> None:
    from domains.lm.probes import run_probe

    run_probe(cfg)


def _sweep(cfg: DictConfig) -> None:
    from domains.lm.sweep import sweep

    sweep(cfg)


def _sweep_report(cfg: DictConfig) -> None:
    from domains.lm.sweep import sweep_report

    sweep_report(cfg)


COMMANDS = {"train": _train, "prepare": _prepare, "eval": _eval, "generate": _generate, "task": _task,
            "probe": _probe, "sweep": _sweep, "sweep-report": _sweep_report}


def main(argv: list[str] | None = None) -> None:
    from core.sweep import sweep_argv

    run_command("lm", COMMANDS, sweep_argv(sys.argv if argv is None else argv))


if __name__ == "__main__":
    main()
