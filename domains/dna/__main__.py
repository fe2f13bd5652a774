"""``python -m domains.dna <command> [key=value ...]``: the DNA domain's CLI.

Commands (configs under ``configs/dna/``):
    prepare    read a genome into the base cache once, print its splits
    pretrain   next-base prediction; exports the model with its tokenizer and data settings
    eval       bits per base and perplexity of an export on a split, and perplexity against context
    finetune   window classification: task=species (4 apes) or task=coding (U. maydis CDS vs intergenic)
    sweep      a scaling sweep (sweep=<name>: configs/dna/sweep/), one pretrain run a point, as a Hydra multirun
    sweep report (or sweep-report)  the sweep's table, power-law fits and plots
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from core.cli import run_command


def _prepare(cfg: DictConfig) -> None:
    from domains.dna.data import DNAData

    data = DNAData(OmegaConf.to_container(cfg.data, resolve=True))  # type: ignore[arg-type]
    print(data.describe())
    for interval in data.intervals:
        print(f"  {interval}")


def _pretrain(cfg: DictConfig) -> None:
    from domains.dna.pretrain import pretrain

    pretrain(cfg)


def _eval(cfg: DictConfig) -> None:
    from domains.dna.evaluate import evaluate

    evaluate(cfg)


def _finetune(cfg: DictConfig) -> None:
    from domains.dna.finetune import finetune

    finetune(cfg)


def _sweep(cfg: DictConfig) -> None:
    from domains.dna.sweep import sweep

    sweep(cfg)


def _sweep_report(cfg: DictConfig) -> None:
    from domains.dna.sweep import sweep_report

    sweep_report(cfg)


COMMANDS = {"prepare": _prepare, "pretrain": _pretrain, "eval": _eval, "finetune": _finetune, "sweep": _sweep,
            "sweep-report": _sweep_report}


def main(argv: list[str] | None = None) -> None:
    from core.sweep import sweep_argv

    run_command("dna", COMMANDS, sweep_argv(sys.argv if argv is None else argv))


if __name__ == "__main__":
    main()
