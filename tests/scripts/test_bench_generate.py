"""scripts/bench_generate.py at its --quick sizes on CPU: the throughput row's graph-vs-eager token check
passes, and --breakdown reports the prefill, the replayed step and the rest of a generate call."""

from __future__ import annotations

import re

from scripts import bench_generate


def test_quick_throughput_with_breakdown(capsys):
    bench_generate.main(["--quick", "--only", "throughput", "--presets", "mamba1-tiny", "--batches", "1", "2",
                         "--breakdown"])
    out, err = capsys.readouterr()
    rows = [line for line in out.splitlines() if line.startswith("| mamba1-tiny |")]
    assert len(rows) == 2, out
    assert all(row.split("|")[3].strip() == "yes" for row in rows), rows  # graph path tokens == eager tokens
    for batch in (1, 2):
        match = re.search(rf"\[breakdown\] mamba1-tiny batch {batch}: whole call ([\d.]+) ms; prefill of 16 tokens "
                          r"([\d.]+) ms \(eager, not captured; eager ([\d.]+) ms\); one replayed step ([\d.]+) ms x 8",
                          err)  # on CPU the static-buffer prefill runs eagerly: "not captured"
        assert match, err
        assert all(float(v) > 0 for v in match.groups())  # the parts are reported (their sizes are timing)
