"""Run every op's GPU correctness checks and print one table; exit non-zero on any failure.

    PYTHONPATH=. python3 scripts/gpu_check.py [--ops causal_conv1d,norm] [--list]

Each module of ``scripts/gpu_checks/`` exposes ``run_checks() -> list[dict]`` (see that package's
docstring for the row keys). A module that fails to import, or whose checks raise, is reported as a
failed row rather than stopping the others. The header gives the device, the torch / triton versions
and the measured device-to-device copy bandwidth (the ceiling for memory-bound kernels).
"""

from __future__ import annotations

import argparse
import importlib
import math
import pkgutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `kernels`

import torch  # noqa: E402

import scripts.gpu_checks as gpu_checks  # noqa: E402


def discover(ops: list[str] | None) -> list[str]:
    """Module names under scripts/gpu_checks/, filtered by --ops."""
    names = sorted(m.name for m in pkgutil.iter_modules(gpu_checks.__path__) if not m.name.startswith("_"))
    if ops:
        unknown = [op for op in ops if op not in names]
        if unknown:
            raise SystemExit(f"unknown op(s) {unknown}; available: {names}")
        names = [n for n in names if n in ops]
    return names


def load(name: str):
    """(module, None) or (None, error text)."""
    try:
        return importlib.import_module(f"scripts.gpu_checks.{name}"), None
    except Exception as error:
        return None, f"import failed: {type(error).__name__}: {error}"


def header() -> str:
    lines = [f"torch {torch.__version__}"]
    try:
        import triton

        lines[0] += f", triton {triton.__version__}"
    except Exception as error:
        lines[0] += f", triton not importable ({error})"
    if torch.cuda.is_available():
        lines.append(f"device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
        lines.append(f"copy bandwidth (read + write): {gpu_checks.copy_bandwidth_gbps():.0f} GB/s")
    else:
        lines.append("device: no CUDA device")
    return "\n".join(lines)


def _get(row: dict, *keys, default=None):
    """A row value under any of the accepted key spellings (modules are written by several people)."""
    for key in keys:
        if key in row:
            return row[key]
    return default


def _fmt_err(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf/nan"
    return f"{value:.2e}"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def run(ops: list[str] | None) -> tuple[list[list[str]], bool]:
    """Every module's check rows; each module's rows are also printed as soon as it finishes (a run cut
    off by a time limit still reports the modules before)."""
    table, ok = [], True
    started = time.perf_counter()
    for name in discover(ops):
        first = len(table)
        print(f"[{name}] checking ({time.perf_counter() - started:.0f} s)", flush=True)
        module, error = load(name)
        rows = []
        if module is not None:
            try:
                rows = module.run_checks()
            except Exception as exc:
                traceback.print_exc()
                error = f"run_checks raised {type(exc).__name__}: {exc}"
        if error is not None:
            table.append([name, error[:100], "-", "-", "-", "-", "FAIL", ""])
            ok = False
            print("  " + " | ".join(table[-1]), flush=True)
            continue
        for row in rows:
            passed = bool(_get(row, "pass", "passed", "ok", default=False))
            ok &= passed
            table.append([
                name, str(_get(row, "name", "case", default="?")), str(_get(row, "shape", default="")),
                str(_get(row, "dtype", default="")).replace("torch.", ""),
                _fmt_err(_get(row, "err_fwd", "rel_err_fwd", "max_rel_err_fwd", "fwd")),
                _fmt_err(_get(row, "err_bwd", "rel_err_bwd", "max_rel_err_bwd", "bwd")),
                "PASS" if passed else "FAIL", str(_get(row, "note", default="")),
            ])
        for row in table[first:]:
            print("  " + " | ".join(row), flush=True)
        print(f"[{name}] done ({time.perf_counter() - started:.0f} s)", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return table, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="", help="comma-separated op modules (default: all)")
    parser.add_argument("--list", action="store_true", help="list the op modules and exit")
    parser.add_argument("--out", default="", help="also write the table as markdown to this file")
    args = parser.parse_args()
    ops = [o for o in args.ops.split(",") if o] or None
    if args.list:
        print("\n".join(discover(None)))
        return
    print(header(), flush=True)
    table, ok = run(ops)
    headers = ["op", "case", "shape", "dtype", "rel err fwd", "rel err bwd", "result", "note"]
    print(format_table(headers, table))
    if args.out:
        Path(args.out).write_text(markdown_table(headers, table) + "\n")
    failed = sum(r[6] == "FAIL" for r in table)
    print(f"\n{len(table) - failed} passed, {failed} failed")
    sys.exit(1 if not ok or failed else 0)


if __name__ == "__main__":
    main()
