"""``python -m domains.dna <command> [key=value ...]``: the DNA domain's CLI.

Commands (configs under ``configs/dna/``):
    prepare    read a genome into the base cache once, print its splits
    pretrain   next-base prediction; exports the model with its tokenizer and data settings
    eval       bits per base and perplexity of an export on a split, and perplexity against context
    finetune   window classification: task=species (4 apes) or task=coding (U. maydis CDS vs intergenic)
"""

from __future__ import annotations

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


COMMANDS = {"prepare": _prepare, "pretrain": _pretrain, "eval": _eval, "finetune": _finetune}


def main() -> None:
    run_command("dna", COMMANDS)


if __name__ == "__main__":
    main()
