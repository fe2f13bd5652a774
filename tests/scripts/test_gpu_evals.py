"""scripts/gpu_evals.py: a clock-sized run equals the CLI run with the same step count, the step count
fits the deadline, the evaluation-size rule matches evaluate_settings', and the tables."""

from __future__ import annotations

import importlib.util
import json
import shlex
import time
from pathlib import Path

import pytest
import torch

from core.backbone import CausalLM
from core.presets import get_preset
from core.training import OptimConfig
from domains.lm.tasks import load_task, run_task, seeded
from domains.lm.tasks.common import TaskBatch, evaluate_settings

ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_evals", ROOT / "scripts" / "gpu_evals.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ge = _load_script()

# induction heads at length 32, scored at 32 and 64: transformer++-tiny trains ~0.05 s a step here.
TINY = ["threads=1", "device=cpu", "task.steps=26", "task.batch_size=8", "task.optim.warmup_steps=24",
        "task.train=[{seq_len:32,vocab:16}]", "task.eval.seq_len_log2.from=5", "task.eval.seq_len_log2.to_cpu=6",
        "task.eval_options.samples=16"]


def test_clock_sized_run_equals_the_cli_run(tmp_path):
    # Far deadlines: N is re-estimated at step 20 (inside the warm-up) and comes out at the cap, 26.
    now = time.time()
    ge.main(["run", "--task", "induction_heads", "--model", "transformer++", "--out", str(tmp_path),
             "--train-until", str(now + 3600), "--eval-until", str(now + 3600), *TINY])
    ours = json.loads((tmp_path / "induction_heads__transformer++.json").read_text())
    assert ours["status"] == "done" and not ours["truncated"] and ours["skipped"] == []
    assert ours["steps"] == ours["planned_steps"] == 26

    cfg, cli = ge.compose_task("induction_heads", "transformer++", TINY)
    assert ours["reproduce"] == "python -m domains.lm task " + shlex.join([*cli, "task.steps=26"])
    assert "'task.train=[{seq_len:32,vocab:16}]'" in ours["reproduce"]  # quoted for a shell
    cfg["run"]["dir"] = None
    theirs = run_task(cfg)
    assert ours["pattern"] == theirs["pattern"] and ours["parameters"] == theirs["parameters"]
    assert ours["final_loss"] == pytest.approx(theirs["final_loss"], rel=1e-6, abs=1e-7)
    assert [r["setting"] for r in ours["rows"]] == [r["setting"] for r in theirs["rows"]] == ["L=32", "L=64"]
    for a, b in zip(ours["rows"], theirs["rows"]):
        assert (a["accuracy"], a["samples"], a["answer_tokens"]) == (b["accuracy"], b["samples"], b["answer_tokens"])


def test_step_count_is_sized_to_the_deadline():
    # Batches that take 30 ms each to draw make the step rate known; N must land inside the budget.
    task = load_task("induction_heads")
    config = get_preset("transformer++-tiny", pattern="*-", vocab_size=16)
    torch.manual_seed(0)
    model = CausalLM(config)

    def slow_batch(step: int) -> TaskBatch:
        time.sleep(0.03)
        return task.generate(4, seeded(step), seq_len=16, vocab=16)

    optim = OptimConfig(lr=1e-3, warmup_steps=10_000, max_steps=10_000)
    budget = 2.5
    until = time.time() + budget
    result = ge.train_to_deadline(model, slow_batch, 10_000, optim, until, 1.0, "cpu", safety=0.6, log_every=0)
    assert not result["truncated"]
    assert result["steps"] == result["planned_steps"] == optim.max_steps
    # At >= 30 ms a step, 2.5 s hold at most ~83 steps; at least the 20 timed before the first estimate.
    assert 20 <= result["steps"] <= budget / 0.03
    assert time.time() <= until + 0.5
    assert len(result["losses"]) == result["steps"]


def test_deadline_stops_a_run_marked_truncated():
    task = load_task("induction_heads")
    torch.manual_seed(0)
    model = CausalLM(get_preset("transformer++-tiny", pattern="*-", vocab_size=16))
    optim = OptimConfig(lr=1e-3, warmup_steps=5, max_steps=1000)  # warm-up too short to size N
    result = ge.train_to_deadline(model, lambda s: task.generate(2, seeded(s), seq_len=16, vocab=16), 1000, optim,
                                  time.time() + 0.5, 1.0, "cpu", safety=0.9, log_every=0)
    assert result["truncated"] and result["planned_steps"] == 1000 and 0 < result["steps"] < 1000


def test_prefetcher_yields_the_cli_batches_in_order():
    task = load_task("mqar")
    make = lambda step: task.generate(2, seeded(7 + step), seq_len=32, num_kv=4, vocab=64)  # noqa: E731
    prefetcher = ge.Prefetcher(make)
    try:
        for step in range(5):
            got = prefetcher.get(step)
            assert torch.equal(got.input_ids, make(step).input_ids) and torch.equal(got.labels, make(step).labels)
    finally:
        prefetcher.close()


def test_prefetcher_passes_errors_on():
    def broken(step: int) -> TaskBatch:
        raise ValueError("bad setting")

    prefetcher = ge.Prefetcher(broken)
    with pytest.raises(ValueError, match="bad setting"):
        prefetcher.get(0)
    prefetcher.close()


@pytest.mark.parametrize("seq_len,samples,max_tokens", [(64, 512, 1_048_576), (2**18, 512, 1_048_576),
                                                        (2**20, 512, 1_048_576), (300, 100, None), (64, 5, 256)])
def test_scored_samples_follows_evaluate_settings(seq_len, samples, max_tokens):
    # evaluate_settings decides how many sequences it scores; the predictor must count the same.
    task = load_task("induction_heads")

    class Tiny(torch.nn.Module):  # scores anything in no time: only the sample count matters here
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            return type("Out", (), {"logits": torch.zeros(*ids.shape, 16)})()

    expected = ge.scored_samples(seq_len, samples, max_tokens)
    if seq_len * expected > 2**16:  # too big to score here: check the rule on its own
        assert expected == max(min(8, samples), min(samples, (max_tokens or 0) // seq_len))
        return
    row = evaluate_settings(Tiny(), task, [{"seq_len": seq_len, "vocab": 16}], samples, 0, 64, max_tokens, log=None)[0]
    assert row["samples"] == expected


def test_eval_cost_grows_quadratically_only_with_attention():
    assert ge.eval_cost(2**20, 8, attention=False) == 2 * ge.eval_cost(2**19, 8, attention=False)
    ratio = ge.eval_cost(2**20, 8, attention=True) / ge.eval_cost(2**19, 8, attention=True)
    assert 3.9 < ratio < 4.0


def _result(task, model, rows, **extra):
    base = {"task": task, "model": model, "pattern": "SS", "parameters": 1234, "steps": 100, "planned_steps": 100,
            "truncated": False, "status": "done", "seconds_per_step": 0.012, "final_loss": 0.5, "rows": rows,
            "skipped": []}
    return {**base, **extra}


def test_tables(tmp_path):
    rows = [{"setting": f"L={2**k}", "seq_len": 2**k, "accuracy": a} for k, a in ((7, 0.5), (6, 1.0))]
    ge.write_json(tmp_path / "induction_heads-gpu__hyena.json", _result(
        "induction_heads-gpu", "hyena", rows, skipped=[{"setting": "L=256", "seq_len": 256}]))
    ge.write_json(tmp_path / "induction_heads-gpu__mamba1.json", _result(
        "induction_heads-gpu", "mamba1", rows[:1], truncated=True, steps=40, planned_steps=90))
    ge.write_json(tmp_path / "mqar-gpu__mamba2.json", _result(
        "mqar-gpu", "mamba2", [{"setting": "L=64 pairs=4", "seq_len": 64, "accuracy": 0.25}], status="evaluating"))
    text = ge.tables(tmp_path)
    lines = text.splitlines()
    assert "#### induction_heads-gpu" in lines and "#### mqar-gpu" in lines
    head = next(line for line in lines if line.startswith("| model"))
    assert head == "| model | pattern | params | 2^6 | 2^7 | 2^8 | steps | ms/step | final loss |"
    # MODELS order (mamba1 before hyena), the skipped length marked, a cut run and an unfinished one noted.
    body = [line for line in lines if line.startswith("| mamba1") or line.startswith("| hyena")]
    assert body[0].startswith("| mamba1 ") and "| - | 0.50 | - | 40 (cut at 40 of 90) | 12 | 0.500 |" in body[0]
    assert "| 1.00 | 0.50 | time | 100 |" in body[1]
    assert "| 0.25 | 100 (evaluating) |" in text
    assert ge.tables(tmp_path / "none").startswith("(no results")
