"""Train several presets on the same corpus at equal tokens and print one markdown table.

    python scripts/compare_lm_presets.py [--presets mamba1-tiny mamba2-tiny ...] [--steps 150] [key=value ...]

Every run is ``python -m domains.lm train model=<preset>`` with the same data, seed, batch and sequence
length (extra Hydra overrides after the options apply to all), writing under ``runs/lm/compare-<preset>``.
The table gives the final validation loss / perplexity / bits per byte, training tokens/s and
wall time, next to the corpus's unigram baseline.
"""

from __future__ import annotations

import argparse
import time

from hydra import compose, initialize_config_dir

from core.cli import CONFIG_ROOT
from core.presets import get_preset
from domains.lm.train import train

DEFAULT_PRESETS = ["mamba1-tiny", "mamba2-tiny", "transformer++-tiny", "hyena-tiny", "hybrid-tiny", "jamba-tiny"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()
    rows = []
    for preset in args.presets:
        overrides = [f"model={preset}", f"trainer.max_steps={args.steps}",
                     f"trainer.val_check_interval={args.steps}", f"run.name=compare-{preset}",
                     "samples.prompts=[]", *args.overrides]
        with initialize_config_dir(config_dir=str(CONFIG_ROOT / "lm"), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        started = time.perf_counter()
        result = train(cfg)
        wall = time.perf_counter() - started
        rows.append((preset, get_preset(preset).pattern, result, wall, int(cfg.trainer.max_steps) * int(cfg.batch_size) * int(cfg.seq_len)))
    unigram = rows[0][2]["unigram_ppl"] if rows else float("nan")
    print(f"\nunigram baseline: val ppl {unigram:.1f}\n")
    print("| preset | pattern | train tokens | val loss | val ppl | bits/byte | tokens/s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, pattern, r, wall, tokens in rows:
        print(f"| {preset} | `{pattern}` | {tokens:,} | {r['val_loss']:.3f} | {r['val_ppl']:.1f} | "
              f"{r['val_bits_per_byte']:.3f} | {r['tokens_per_s']:,.0f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
