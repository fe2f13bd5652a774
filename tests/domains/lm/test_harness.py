"""The lm-evaluation-harness adapter: its scoring functions against direct computations (with or
without lm-eval installed), and lm-eval's own command line running three local tasks offline
(multiple choice, rolling perplexity, generation) over a tiny export, checked sample by sample."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core.backbone import CausalLM
from core.checkpoint import save_export
from core.presets import get_preset
from domains.lm.harness import cut_at_stop, rolling_loglikelihood, rolling_windows, score_continuations
from domains.lm.tokenizer import LMTokenizer

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


@pytest.fixture(scope="module")
def model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(get_preset("mamba2-tiny", vocab_size=40)).eval()


@torch.no_grad()
def direct_logprob(model: CausalLM, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one forward of the whole sequence, alone."""
    ids = torch.tensor([context + continuation])
    logprobs = F.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(continuation))


def test_score_continuations_equals_direct_computation(model: CausalLM) -> None:
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randint(0, 40, (n,), generator=g).tolist(), torch.randint(0, 40, (m,), generator=g).tolist())
             for n, m in [(1, 1), (7, 3), (20, 1), (3, 9), (13, 5)]]
    for batch_size in (1, 2, 8):  # right padding in batches changes nothing
        got = score_continuations(model, pairs, batch_size=batch_size)
        for (ctx, cont), (value, _) in zip(pairs, got):
            ref = direct_logprob(model, ctx, cont)
            assert abs(value - ref) / abs(ref) < 1e-5


def test_greedy_flag_and_truncation(model: CausalLM) -> None:
    context = [3, 5, 7, 9, 11]
    with torch.no_grad():
        greedy = []
        ids = list(context)
        for _ in range(3):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            greedy.append(nxt)
            ids.append(nxt)
    other = [(greedy[0] + 1) % 40] + greedy[1:]
    (_, is_greedy), (_, not_greedy) = score_continuations(model, [(context, greedy), (context, other)])
    assert is_greedy and not not_greedy
    # max_length keeps the last tokens of the input, as a model with a bounded context would see them.
    long_context = list(range(1, 31))
    (value, _), = score_continuations(model, [(long_context, [4, 2])], max_length=10)
    ref = direct_logprob(model, long_context[-9:], [4, 2])
    assert abs(value - ref) / abs(ref) < 1e-5
    with pytest.raises(ValueError, match="context and continuation must both have tokens"):
        score_continuations(model, [([], [1])])


@pytest.mark.parametrize("n, max_length", [(1, 4), (4, 4), (10, 4), (11, 3), (9, 1), (5, 100)])
def test_rolling_windows_predict_every_token_once_with_full_context(n: int, max_length: int) -> None:
    tokens = list(range(100, 100 + n))
    full = [-1] + tokens
    predicted = []
    for inputs, targets in rolling_windows(tokens, -1, max_length):
        assert 1 <= len(inputs) <= max_length and len(targets) <= len(inputs)
        # The window is a slice of [prefix] + tokens, its last len(targets) positions predict targets.
        start = full.index(inputs[0])
        assert full[start:start + len(inputs)] == inputs
        assert full[start + len(inputs) - len(targets) + 1:start + len(inputs) + 1] == targets
        assert len(inputs) == min(max_length, start + len(inputs))  # as much context as fits
        predicted += targets
    assert predicted == tokens


def test_rolling_loglikelihood(model: CausalLM) -> None:
    tokens = torch.randint(1, 40, (23,), generator=torch.Generator().manual_seed(2)).tolist()
    whole = rolling_loglikelihood(model, tokens, 0, max_length=64)
    ref = direct_logprob(model, [0], tokens)
    assert abs(whole - ref) / abs(ref) < 1e-5
    windowed = rolling_loglikelihood(model, tokens, 0, max_length=8)
    manual = 0.0
    for inputs, targets in rolling_windows(tokens, 0, 8):
        manual += _window_logprob(model, inputs, targets)
    assert abs(windowed - manual) / abs(manual) < 1e-5


@torch.no_grad()
def _window_logprob(model: CausalLM, inputs: list[int], targets: list[int]) -> float:
    """log p(targets) read off the last len(targets) positions of one forward over inputs."""
    logprobs = F.log_softmax(model(torch.tensor([inputs])).logits[0].double(), dim=-1)
    n = len(targets)
    return sum(float(logprobs[len(inputs) - n + i, t]) for i, t in enumerate(targets))


def test_cut_at_stop() -> None:
    assert cut_at_stop("answer: 42\n\nQuestion", ["\n\n", "Question"]) == "answer: 42"
    assert cut_at_stop("no stop here", ["\n"]) == "no stop here"
    assert cut_at_stop("abc", [""]) == "abc"


# -- lm-eval end to end ----------------------------------------------------------------------------

TASKS_YAML = {
    "tiny_mc": """
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""",
    "tiny_ppl": """
task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder}/ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "tiny_gen": """
task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval is not installed (pip install -e '.[eval]')")
def test_lm_eval_cli_runs_local_tasks_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    texts = ["The sky is blue. The grass is green. What colour is the sky? blue",
             "Two plus two is four. One plus one is two."] * 10
    tok = LMTokenizer.train(texts, vocab_size=300)
    torch.manual_seed(0)
    net = CausalLM(get_preset("transformer++-tiny", vocab_size=tok.vocab_size)).eval()
    export = tmp_path / "export"
    save_export(net, export, tokenizer_json=tok.hf.to_str(), extra={"seq_len": 64})

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = {
        "mc": [{"question": "The sky is", "choices": [" blue", " green", " four"], "answer": 0},
               {"question": "Two plus two is", "choices": [" two", " four"], "answer": 1}],
        "ppl": [{"text": "The sky is blue. The grass is green."}, {"text": "One plus one is two."}],
        "gen": [{"question": "What colour is the sky?", "answer": " blue"}],
    }
    for name, rows in docs.items():
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for name, text in TASKS_YAML.items():
        (tasks / f"{name}.yaml").write_text(text.format(folder=tasks), encoding="utf-8")

    from lm_eval.tasks import TaskManager

    from domains.lm import harness

    # Index only the local tasks: lm-eval's ~10k built-in task YAMLs take ~25 s to parse on a CI CPU
    # and have nothing to do with the adapter (the CLI offers no switch for this).
    index_all = TaskManager.__init__

    def index_local_only(self, *args, **kwargs) -> None:
        index_all(self, *args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(TaskManager, "__init__", index_local_only)
    out_dir = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "lm_eval", "--model", "ssm-suite", "--model_args", f"checkpoint={export},max_length=32",
        "--tasks", "tiny_mc,tiny_ppl,tiny_gen", "--include_path", str(tasks), "--device", "cpu",
        "--batch_size", "2", "--output_path", str(out_dir), "--log_samples"])
    harness.main()

    results_files = sorted(out_dir.rglob("results_*.json"))
    assert results_files, f"lm-eval wrote no results under {out_dir}"
    results = json.loads(results_files[-1].read_text())["results"]
    assert {"tiny_mc", "tiny_ppl", "tiny_gen"} <= set(results)

    samples: dict[str, list[dict]] = {}
    for path in out_dir.rglob("samples_*.jsonl"):
        samples[path.name] = [json.loads(line) for line in path.read_text().splitlines()]
    # Multiple choice: each choice's log-likelihood is log p(continuation | context) computed directly,
    # the pair split as lm-eval's TemplateLM documents (encode the whole, cut at the context's length).
    mc = [r for rs in samples.values() for r in rs if "choices" in r["doc"]]
    assert len(mc) == 2
    for record in mc:
        for args, resp in zip(record["arguments"].values(), record["resps"]):
            context_text, continuation_text = args["arg_0"], args["arg_1"]
            context = tok.encode(context_text)
            whole = tok.encode(context_text + continuation_text)
            ref = direct_logprob(net, context, whole[len(context):])
            assert abs(float(resp[0][0]) - ref) / abs(ref) < 1e-4
    acc = sum(float(r["acc"]) for r in mc) / 2
    assert math.isclose(results["tiny_mc"]["acc,none"], acc)
    # Rolling: the document's log-likelihood from the end-of-text token, windows of max_length=32.
    ppl = [r for rs in samples.values() for r in rs if "text" in r["doc"]]
    assert len(ppl) == 2
    for record in ppl:
        value = float(record["resps"][0][0])
        ids = tok.encode(record["doc"]["text"])
        ref = rolling_loglikelihood(net, ids, tok.eot_id, 32)
        assert abs(value - ref) / abs(ref) < 1e-4
    assert results["tiny_ppl"]["word_perplexity,none"] > 1.0
    # Generation: greedy text cut at the stop string.
    gen = [r for rs in samples.values() for r in rs if "question" in r["doc"] and "choices" not in r["doc"]]
    assert len(gen) == 1 and "\n" not in gen[0]["resps"][0][0]
    assert results["tiny_gen"]["exact_match,none"] in (0.0, 1.0)
