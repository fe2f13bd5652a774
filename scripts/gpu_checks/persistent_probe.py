"""Can this GPU capture the persistent Mamba-1 decode kernel in a CUDA graph with a cooperative launch?
Prints "cooperative ok" or the error, and exits 1 on error (scripts use it to set
SSM_SUITE_COOPERATIVE_DECODE=0 before the benchmarks).  Run: PYTHONPATH=. python3 scripts/gpu_checks/persistent_probe.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from core.cuda_graph import CUDAGraphRunner  # noqa: E402
from core.backbone import CausalLM  # noqa: E402
from core.presets import get_preset  # noqa: E402


def main() -> None:
    with torch.device("cuda"):
        model = CausalLM(get_preset("mamba1-130m")).to(torch.bfloat16).eval()
    try:
        runner = CUDAGraphRunner(model, 1, 64, capture=True)
        runner.begin(8)
        for _ in range(3):
            runner.step(torch.zeros(1, dtype=torch.long, device="cuda"))
        torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001
        print(f"cooperative capture failed: {type(error).__name__}: {error}"[:500])
        sys.exit(1)
    print("cooperative ok")


if __name__ == "__main__":
    main()
