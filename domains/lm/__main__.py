"""``python -m domains.lm <command> [key=value ...]``: the language domain's CLI.

Commands (configs under ``configs/lm/``):
    train     prepare the corpus (if needed), train, export, print samples
    prepare   tokenize a corpus into packed shards (train does this itself)
    eval      perplexity and bits per byte of an export on a split
    generate  sample continuations of prompts from an export
    task      train a model on a synthetic recall task and print its accuracy per setting
    probe     long-context probes of an export (needle in a haystack, variable tracking, ppl by position)
"""

from __future__ import annotations

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


COMMANDS = {"train": _train, "prepare": _prepare, "eval": _eval, "generate": _generate, "task": _task,
            "probe": _probe}


def main() -> None:
    run_command("lm", COMMANDS)


if __name__ == "__main__":
    main()
