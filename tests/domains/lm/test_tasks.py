"""Synthetic recall tasks: each generator against an independent solver (the labels are what the task
says they are), determinism, input errors, exact-match scoring, the CLI wiring, and that a tiny model
trained for a few seconds on an easy setting beats chance."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from core.backbone import IGNORE_INDEX, CausalLM
from core.checkpoint import load_export
from core.cli import CONFIG_ROOT, run_command
from core.training import OptimConfig
from domains.lm.tasks import TASKS, load_task, run_task, score_predictions, seeded
from domains.lm.tasks.common import (
    evaluate_settings,
    expand_eval,
    score_model,
    task_model_config,
    train_on_task,
)

SMALL = {
    "selective_copying": {"seq_len": 13, "num_tokens": 3, "vocab": 5},
    "induction_heads": {"seq_len": 11, "vocab": 5},
    "mqar": {"seq_len": 22, "num_kv": 5, "vocab": 24},
    "phonebook": {"num_entries": 5, "num_queries": 3, "name_len": 2, "number_len": 3, "name_vocab": 4},
}


# -- independent solvers: read the answer off the input, the way the task defines it --------------

def solve_selective_copying(ids: list[int], seq_len: int, num_tokens: int, vocab: int) -> list[int]:
    data = [t for t in ids[:seq_len] if t != 0]
    assert ids[seq_len:] == [1] * num_tokens and all(2 <= t < vocab + 2 for t in data)
    return [-100] * seq_len + data


def solve_induction_heads(ids: list[int], seq_len: int, vocab: int) -> list[int]:
    assert ids[-1] == 0 and ids.count(0) == 2
    first = ids.index(0)
    return [-100] * (seq_len - 1) + [ids[first + 1]]


def solve_mqar(ids: list[int], seq_len: int, num_kv: int, vocab: int) -> list[int]:
    table = dict(zip(ids[0:2 * num_kv:2], ids[1:2 * num_kv:2]))
    assert len(table) == num_kv and all(0 < k < vocab // 2 <= table[k] < vocab for k in table)
    out = [-100] * (2 * num_kv)
    for t in ids[2 * num_kv:]:
        out.append(table[t] if t != 0 else -100)
    asked = [t for t in ids[2 * num_kv:] if t != 0]
    assert sorted(asked) == sorted(table)  # every key asked once
    return out


def solve_phonebook(ids: list[int], num_entries: int, num_queries: int, name_len: int, number_len: int,
                    name_vocab: int) -> list[int]:
    entry = name_len + number_len + 2                     # n_1 .. n_k : d_1 .. d_m ;
    book = {}
    for e in range(num_entries):
        chunk = ids[e * entry:(e + 1) * entry]
        assert chunk[name_len] == 0 and chunk[-1] == 1
        book[tuple(chunk[:name_len])] = chunk[name_len + 1:-1]
    assert len(book) == num_entries  # names are distinct
    out = [-100] * (num_entries * entry)
    pos, asked = len(out), set()
    while pos < len(ids):                                 # ? n_1 .. n_k : d_1 .. d_m ;
        assert ids[pos] == 2
        name = tuple(ids[pos + 1:pos + 1 + name_len])
        number = book[name]
        asked.add(name)
        assert ids[pos + name_len + 2:pos + name_len + 2 + number_len] == number
        # ':' predicts d_1 and d_i predicts d_{i+1}; the last digit and ';' predict nothing.
        out += [-100] * (name_len + 1) + number + [-100, -100]
        pos += name_len + number_len + 3
    assert len(asked) == num_queries and pos == len(ids)
    return out


SOLVERS = {"selective_copying": solve_selective_copying, "induction_heads": solve_induction_heads,
           "mqar": solve_mqar, "phonebook": solve_phonebook}


@pytest.mark.parametrize("name", TASKS)
def test_labels_match_an_independent_solver(name: str) -> None:
    task, params = load_task(name), SMALL[name]
    batch = task.generate(6, seeded(3), **params)
    assert batch.input_ids.dtype == torch.long and batch.labels.dtype == torch.long
    assert int(batch.input_ids.max()) < task.vocab_size(**params) and int(batch.input_ids.min()) >= 0
    for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist()):
        assert labels == SOLVERS[name](ids, **params)
    # A perfect predictor scores 1, one wrong answer token lowers the score by exactly one token.
    score = score_predictions(batch.labels.clamp(min=0), batch.labels)
    assert score.accuracy == 1.0 and score.sequence_accuracy == 1.0
    wrong = batch.labels.clamp(min=0).clone()
    first_answer = int((batch.labels[0] != IGNORE_INDEX).nonzero()[0])
    wrong[0, first_answer] += 1
    score = score_predictions(wrong, batch.labels)
    assert score.correct_tokens == score.answer_tokens - 1 and score.correct_sequences == 5


@pytest.mark.parametrize("name", TASKS)
def test_generators_are_seeded(name: str) -> None:
    task, params = load_task(name), SMALL[name]
    a, b = task.generate(4, seeded(7), **params), task.generate(4, seeded(7), **params)
    c = task.generate(4, seeded(8), **params)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_answers_are_spread_over_the_context() -> None:
    """Data tokens / triggers / queries land everywhere, not at fixed offsets (what defeats LTI models)."""
    sc = load_task("selective_copying").generate(512, seeded(0), seq_len=16, num_tokens=2, vocab=4)
    seen = (sc.input_ids[:, :16] != 0).float().mean(dim=0)
    assert float(seen.min()) > 0.05 and float(seen.max()) < 0.25  # 2/16 = 0.125 on average
    ih = load_task("induction_heads").generate(512, seeded(0), seq_len=12, vocab=6)
    first = (ih.input_ids[:, :-1] == 0).float().argmax(dim=1)
    assert set(first.tolist()) == set(range(10))
    mq = load_task("mqar").generate(256, seeded(0), seq_len=64, num_kv=4, vocab=64)
    where = (mq.labels != IGNORE_INDEX).nonzero()[:, 1]
    assert int(where.min()) == 8 and int(where.max()) > 30  # power law: mostly near, sometimes far


@pytest.mark.parametrize("name, params, message", [
    ("selective_copying", {"seq_len": 2, "num_tokens": 3, "vocab": 4}, "seq_len >= num_tokens"),
    ("induction_heads", {"seq_len": 2, "vocab": 4}, "seq_len must be an int >= 3"),
    ("mqar", {"seq_len": 15, "num_kv": 4, "vocab": 64}, "seq_len >= 16"),
    ("mqar", {"seq_len": 64, "num_kv": 8, "vocab": 16}, "raise vocab"),
    ("phonebook", {"num_entries": 20, "name_len": 2, "name_vocab": 4}, "raise name_vocab or name_len"),
    ("phonebook", {"num_entries": 2, "num_queries": 3}, "num_queries=3 > num_entries=2"),
])
def test_bad_settings_name_the_fix(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_task(name).generate(2, seeded(0), **params)


def test_phonebook_large_name_space_draws_distinct_names() -> None:
    b = load_task("phonebook").generate(8, seeded(0), num_entries=64, num_queries=2, name_len=3,
                                        number_len=2, name_vocab=64)  # 262144 names: rejection sampling
    entry = 3 + 2 + 2
    names = b.input_ids[:, :64 * entry].reshape(8, 64, entry)[:, :, :3]
    for row in names:
        assert len({tuple(n) for n in row.tolist()}) == 64


def test_score_rejects_rows_without_answers() -> None:
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[0, 1] = 3
    with pytest.raises(ValueError, match="no answer position"):
        score_predictions(torch.zeros(2, 4, dtype=torch.long), labels)


def test_expand_eval_and_hyena_support() -> None:
    spec = {"base": {"vocab": 16}, "seq_len_log2": {"from": 5, "to_cpu": 7, "to_gpu": 9}}
    assert [s["seq_len"] for s in expand_eval(spec, torch.device("cpu"))] == [32, 64, 128]
    assert [s["seq_len"] for s in expand_eval(spec, torch.device("cuda"))] == [32, 64, 128, 256, 512]
    config = task_model_config("hyena-tiny", 16, 4096)
    assert config.hyena.max_seqlen == 4096 and config.vocab_size == 16
    assert task_model_config("mamba2-tiny", 18, 4096).vocab_size == 18


# -- learning ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, preset, params, chance", [
    ("mqar", "transformer++-tiny", {"seq_len": 16, "num_kv": 2, "vocab": 16}, 1 / 8),
    ("selective_copying", "hyena-tiny", {"seq_len": 8, "num_tokens": 2, "vocab": 4}, 1 / 4),
])
def test_tiny_model_beats_chance_on_an_easy_setting(name: str, preset: str, params: dict, chance: float) -> None:
    task = load_task(name)
    torch.manual_seed(0)
    model = CausalLM(task_model_config(preset, task.vocab_size(**params), 64))
    before = score_model(model, task.generate(128, seeded(10**6), **params)).accuracy
    steps = 60
    losses = train_on_task(model, lambda s: task.generate(16, seeded(s), **params), steps,
                           OptimConfig(lr=1e-2, warmup_steps=5, max_steps=steps), log_every=0)
    rows = evaluate_settings(model, task, [params], num_samples=128, seed=0, batch_size=128, log=None)
    assert rows[0]["accuracy"] > 3 * chance, (before, rows)
    assert before < 2 * chance
    assert sum(losses[-10:]) < sum(losses[:10])


# -- the command -----------------------------------------------------------------------------------

def test_run_task_writes_results_and_a_loadable_export(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_ROOT / "lm"), version_base="1.3"):
        cfg = compose("task", overrides=[
            "task=phonebook", "model=mamba2-tiny", "task.steps=2", "task.batch_size=4", "run.name=test",
            f"run.dir={tmp_path}",
            "task.eval_options.samples=4", "device=cpu", "log_every=1",
            "task.train=[{num_entries: 3, num_queries: 1, name_len: 1, number_len: 2, name_vocab: 8}]",
            "task.eval=[{num_entries: 3, num_queries: 1, name_len: 1, number_len: 2, name_vocab: 8},"
            "{num_entries: 5, num_queries: 1, name_len: 1, number_len: 2, name_vocab: 8}]",
        ], return_hydra_config=False)
    results = run_task(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    assert [r["setting"] for r in saved["rows"]] == ["entries=3 queries=1", "entries=5 queries=1"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["samples"] == 4 for r in saved["rows"])
    model = load_export(tmp_path / "export")
    assert model.config.vocab_size == load_task("phonebook").vocab_size(name_vocab=8)


def test_compiled_task_model_trains_like_the_eager_one(tmp_path: Path) -> None:
    losses = {}
    for compiled in (False, True):
        with initialize_config_dir(config_dir=str(CONFIG_ROOT / "lm"), version_base="1.3"):
            cfg = compose("task", overrides=[
                "task=mqar", "model=hybrid-tiny", "task.steps=3", "task.batch_size=4", "device=cpu",
                "run.name=test", f"run.dir={tmp_path / str(compiled)}", "task.eval_options.samples=4", "log_every=1",
                "task.train=[{seq_len: 32, num_kv: 4, vocab: 64}]", "task.eval=[{seq_len: 32, num_kv: 4, vocab: 64}]",
                f"compile={str(compiled).lower()}", "compile_backend=aot_eager"])
        results = run_task(cfg)
        losses[compiled] = (results["final_loss"], results["rows"][0]["accuracy"])
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert load_export(tmp_path / "True" / "export").config.pattern == "M--*M-"


def test_every_shipped_task_config_composes() -> None:
    names = sorted(p.stem for p in (CONFIG_ROOT / "lm" / "task").glob("*.yaml"))
    assert {"selective_copying", "induction_heads", "mqar", "phonebook"} <= set(names)
    for name in names:
        with initialize_config_dir(config_dir=str(CONFIG_ROOT / "lm"), version_base="1.3"):
            cfg = compose("task", overrides=[f"task={name}"])
        task = load_task(cfg.task.module)
        settings = list(cfg.task.train) + expand_eval(cfg.task.eval, torch.device("cpu"))
        for s in settings:
            task.generate(1, seeded(0), **dict(s))  # every setting is valid


def test_cli_task_command(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m domains.lm task ...`` through the CLI's dispatcher, in process (Hydra app included)."""
    from domains.lm.__main__ import COMMANDS

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # run_command rewrites sys.argv for Hydra

    run_command("lm", COMMANDS, argv=[
        "domains.lm", "task", "task=induction_heads", "model=hyena-tiny", "task.steps=1", "task.batch_size=2",
        "task.eval_options.samples=2", "task.eval.seq_len_log2.to_cpu=6", "device=cpu", f"run.dir={tmp_path}",
        "run.export=false"])
    out = capsys.readouterr().out
    assert "| L=32 | 32 |" in out and "| L=64 | 64 |" in out
    assert (tmp_path / "results.json").is_file() and not (tmp_path / "export").exists()
