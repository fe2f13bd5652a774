"""The persistent Mamba-1 decode kernel's settings on a GPU: how its grid barriers poll (atomic
read-modify-write or volatile loads) and how many programs it runs, each against the blocks run one
fused op at a time (PDL-chained kernels). Every setting's logits over 16 teacher-forced steps must equal
the block-by-block runner's bit for bit; then one decoding step of mamba1-130m (CUDA-graph replay) is
timed. Run on the GPU machine:  PYTHONPATH=. python3 scripts/gpu_checks/persistent_sweep.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])

import torch  # noqa: E402

import scripts.gpu_checks.mamba_decode as md  # noqa: E402
from kernels.mamba_decode import triton as fused  # noqa: E402

SETTINGS = [("atomic", 0), ("load", 0), ("load", 132), ("load", 96), ("atomic", 132)]


def teacher_forced(runner, model, batch: int, steps: int = 16) -> torch.Tensor:
    md._prefill(model, runner, batch)
    gen = torch.Generator(device="cuda").manual_seed(7)
    tokens = torch.randint(0, 1000, (steps, batch), device="cuda", generator=gen)
    return torch.stack([runner.step(t).clone() for t in tokens])


def main() -> None:
    print(f"device: {torch.cuda.get_device_name()}, SMs {torch.cuda.get_device_properties(0).multi_processor_count}")
    model = md.build_model()
    print("| setting | batch | step ms | blocks one by one ms | one-by-one / persistent | logits equal |")
    print("|---|---|---|---|---|---|")
    for batch in (1, 2):
        base = md._runner(model, batch, 64, True, True, persistent=False)
        want = teacher_forced(base, model, batch)
        base_ms = md._time_replays(base)
        del base
        for poll, programs in SETTINGS:
            os.environ[fused.POLL_ENV], os.environ[fused.PROGRAMS_ENV] = poll, str(programs)
            try:
                runner = md._runner(model, batch, 64, True, True, persistent=True)
                got = teacher_forced(runner, model, batch)
                ms = md._time_replays(runner)
                del runner
                print(f"| poll {poll}, programs {programs or 'default'} | {batch} | {ms:.4f} | {base_ms:.4f} | "
                      f"{base_ms / ms:.2f}x | {torch.equal(got, want)} |", flush=True)
            except Exception as error:  # noqa: BLE001
                print(f"| poll {poll}, programs {programs} | {batch} | raised {type(error).__name__}: {error} |"[:300],
                      flush=True)
            finally:
                os.environ.pop(fused.POLL_ENV), os.environ.pop(fused.PROGRAMS_ENV)


if __name__ == "__main__":
    main()
