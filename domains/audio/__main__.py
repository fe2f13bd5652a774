"""``python -m domains.audio <command> [key=value ...]``: the audio domain's CLI.

Commands (configs under ``configs/audio/``):
    prepare   synthesize / render / index the data (data=digits|music|folder); train does it too
    train     train a sample-level model (model=sashimi-mamba|sashimi-s4d|flat-mamba|...), export it
    eval      NLL in bits per sample of an export on a split, per context length
    generate  unconditional or prompted samples of an export, as WAV files
    metrics   FID / IS / mIS / AM of folders of WAVs from a digit classifier (data=digits)
"""

from __future__ import annotations

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


COMMANDS = {"prepare": _prepare, "train": _train, "eval": _eval, "generate": _generate, "metrics": _metrics}


def main() -> None:
    run_command("audio", COMMANDS)


if __name__ == "__main__":
    main()
