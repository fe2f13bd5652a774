"""``python -m domains.audio <command> [key=value ...]``: the audio domain's CLI.

Commands (configs under ``configs/audio/``):
    prepare   synthesize / render / index the data (data=digits|music|folder); train does it too
    train     train a sample-level model (model=sashimi-mamba|sashimi-s4d|flat-mamba|...), export it
    eval      NLL in bits per sample of an export on a split, per context length
    generate  unconditional or prompted samples of an export, as WAV files
    metrics   FID / IS / mIS / AM of folders of WAVs from a digit classifier (data=digits)
    sweep     a scaling sweep (sweep=<name>: configs/audio/sweep/), one train run a point, as a Hydra multirun
    sweep report (or sweep-report)  the sweep's table, power-law fits and plots
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from core.cli import run_command


def _prepare(cfg: DictConfig) -> None:
    from domains.audio.data import prepare

    print(prepare(OmegaConf.to_container(cfg.data, resolve=True)).describe())


def _train(cfg: DictConfig) -> None:
    from domains.audio.train import train

    train(cfg)


def _eval(cfg: DictConfig) -> None:
    from domains.audio.evaluate import evaluate

    evaluate(cfg)


def _generate(cfg: DictConfig) -> None:
    from domains.audio.sample import sample

    sample(cfg)


def _metrics(cfg: DictConfig) -> None:
    from domains.audio.metrics import metrics

    metrics(cfg)


def _sweep(cfg: DictConfig) -> None:
    from domains.audio.sweep import sweep

    sweep(cfg)


def _sweep_report(cfg: DictConfig) -> None:
    from domains.audio.sweep import sweep_report

    sweep_report(cfg)


COMMANDS = {"prepare": _prepare, "train": _train, "eval": _eval, "generate": _generate, "metrics": _metrics,
            "sweep": _sweep, "sweep-report": _sweep_report}


def main(argv: list[str] | None = None) -> None:
    from core.sweep import sweep_argv

    run_command("audio", COMMANDS, sweep_argv(sys.argv if argv is None else argv))


if __name__ == "__main__":
    main()
