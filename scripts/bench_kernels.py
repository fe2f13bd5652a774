"""Run every op's GPU benchmarks and print one table (ours vs mamba_ssm / causal_conv1d).

    PYTHONPATH=. python3 scripts/bench_kernels.py [--ops causal_conv1d,norm] [--out table.md]

Each module of ``scripts/gpu_checks/`` exposes ``run_bench() -> list[dict]`` (see that package's
docstring for the row keys). Times are medians of CUDA-event timings (triton.testing.do_bench).
ratio = baseline ms / ours ms (above 1: ours is faster), on fwd+bwd where both have it, else fwd.
GB/s counts the fewest bytes the pass must move (each input read once, each output written once);
% copy compares that with the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import scripts.gpu_checks as gpu_checks  # noqa: E402
from scripts.gpu_check import _get, discover, format_table, header, load, markdown_table  # noqa: E402


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="", help="comma-separated op modules (default: all)")
    parser.add_argument("--out", default="", help="also write the table as markdown to this file")
    args = parser.parse_args()
    ops = [o for o in args.ops.split(",") if o] or None
    print(header(), flush=True)
    copy_gbps = gpu_checks.copy_bandwidth_gbps() if torch.cuda.is_available() else float("nan")
    table, failed = [], False
    for name in discover(ops):
        module, error = load(name)
        rows = []
        if module is not None:
            try:
                rows = module.run_bench()
            except Exception as exc:
                traceback.print_exc()
                error = f"run_bench raised {type(exc).__name__}: {exc}"
        if error is not None:
            table.append([name, error[:100]] + ["-"] * 7)
            failed = True
            continue
        for row in rows:
            fwd = _get(row, "ours_fwd_ms", "fwd_ms")
            fb = _get(row, "ours_fwdbwd_ms", "fwdbwd_ms")
            base_fwd = _get(row, "mamba_ssm_fwd_ms", "baseline_fwd_ms", "mamba_ssm_ms")
            base_fb = _get(row, "mamba_ssm_fwdbwd_ms", "baseline_fwdbwd_ms")
            if fb is not None and base_fb is not None:
                ratio = f"{base_fb / fb:.2f} (f+b)"
            elif fwd is not None and base_fwd is not None:
                ratio = f"{base_fwd / fwd:.2f} (fwd)"
            else:
                ratio = "-"
            gbps_cells = []
            for ms, key in ((fwd, "bytes_fwd"), (fb, "bytes_fwdbwd")):
                nbytes = row.get(key)
                gbps = row.get("gbps_fwd" if key == "bytes_fwd" else "gbps_fwdbwd")
                if gbps is None and nbytes and ms:
                    gbps = nbytes / (ms * 1e-3) / 1e9
                gbps_cells.append("-" if gbps is None else f"{gbps:.0f} ({100 * gbps / copy_gbps:.0f}%)")
            table.append([f"{name}: {_get(row, 'kernel', default='?')}", str(_get(row, "shape", default="")),
                          _ms(fwd), _ms(fb), _ms(base_fwd), _ms(base_fb), ratio, *gbps_cells])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    headers = ["kernel", "shape", "ours fwd ms", "ours fwd+bwd ms", "base fwd ms", "base fwd+bwd ms",
               "ratio base/ours", "fwd GB/s (% copy)", "fwd+bwd GB/s (% copy)"]
    print(format_table(headers, table))
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    if args.out:
        Path(args.out).write_text(markdown_table(headers, table) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
