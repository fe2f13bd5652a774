"""The shape every domain's CLI shares: ``python -m domains.<name> <command> [hydra overrides]``.

Each command is a Hydra app whose primary config is ``configs/<domain>/<command>.yaml``, so overrides,
``--cfg job``, ``--help`` and multirun (``-m``) behave as Hydra documents, and a typo in a key or a
config-group choice fails with Hydra's message before any work starts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"


def run_command(domain: str, commands: Mapping[str, Callable[[DictConfig], object]],
                argv: list[str] | None = None) -> None:
    """Dispatch ``argv[1]`` (the command) to its Hydra app; the rest of argv are Hydra's."""
    argv = list(sys.argv if argv is None else argv)
    usage = (f"usage: python -m domains.{domain} <command> [key=value ...]\n"
             f"commands: {', '.join(commands)}\n"
             f"configs: {CONFIG_ROOT / domain}")
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(usage)
        raise SystemExit(0 if len(argv) >= 2 else 2)
    command = argv[1]
    if command not in commands:
        print(f"unknown command {command!r}\n{usage}", file=sys.stderr)
        raise SystemExit(2)
    config_dir = CONFIG_ROOT / domain
    if not (config_dir / f"{command}.yaml").exists():
        raise FileNotFoundError(f"missing config {config_dir / command}.yaml (is the checkout complete?)")
    rest = argv[2:]
    # `task selective_copying` reads as `task task=selective_copying`: a bare word names the config
    # group of the same name as the command.
    if rest and "=" not in rest[0] and not rest[0].startswith("-"):
        rest[0] = f"{command}={rest[0]}"
    sys.argv = [f"domains.{domain} {command}", *rest]
    app = hydra.main(config_path=str(config_dir), config_name=command, version_base="1.3")(commands[command])
    app()
