"""EleutherAI lm-evaluation-harness adapter: our exports and tokenizer as an lm-eval model.

    pip install -e '.[eval]'
    python -m domains.lm.harness --model ssm-suite --model_args checkpoint=runs/lm/<run> \\
        --tasks <task> [--include_path <folder of local task YAMLs>] [--device cpu] [--batch_size 8]

``python -m domains.lm.harness`` is lm-eval's own command line (``lm_eval``, every flag included) after
registering the model class: lm-eval finds models only in its registry and has no plugin entry point,
so the plain ``lm_eval`` executable cannot see ours. From Python, ``import domains.lm.harness`` and
then ``lm_eval.simple_evaluate(model="ssm-suite", model_args="checkpoint=...", ...)``.

Model arguments (``--model_args key=value,...``):
    checkpoint  a training run's folder or its export folder (needs ``tokenizer.json``), required
    device      cpu / cuda / cuda:N / auto (default: auto, or lm-eval's ``--device``)
    batch_size  rows per forward (lm-eval's ``--batch_size``; "auto" means 8)
    max_length  longest input in tokens; longer contexts keep their last max_length tokens
                (default: Hyena's filter length, else 8 x the training seq_len, at least 2048)
    dtype       float32 / bfloat16 / float16 (default: the export's)

The three request types are computed without lm-eval (the functions below), so they are tested with
or without it installed:

- ``loglikelihood``: ``context + continuation`` is encoded as a whole and split where the context's
  encoding ends (lm-eval's ``TemplateLM`` rule: trailing spaces of the context move to the
  continuation); an empty context is conditioned on the end-of-text token, the training data's
  document separator. Rows of a batch are right-padded: the models are causal, so positions before
  the padding are exact.
- ``loglikelihood_rolling``: each document is scored as a whole, in windows of ``max_length`` where
  every token is predicted once with as much context as fits (lm-eval's rolling-window rule).
- ``generate_until``: greedy (or sampled, with ``do_sample`` / ``temperature``) continuation with the
  inference cache, cut at the first stop string; stops when every row has produced one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.generate import generate

REGISTERED_NAMES = ("ssm-suite", "ssm_suite")


# --------------------------------------------------------------------------------------------------
# Scoring, independent of lm-eval
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def score_continuations(model: nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                        batch_size: int = 8, max_length: int | None = None) -> list[tuple[float, bool]]:
    """(log p(continuation | context), continuation is the greedy one) of each (context, continuation)
    pair of token-id lists. The context must be non-empty and the continuation too.

    Inputs longer than ``max_length`` keep their last ``max_length`` tokens (the continuation must fit).
    Pairs are scored longest first in right-padded batches; results come back in the input order.
    """
    device = next(model.parameters()).device
    items = []
    for i, (context, continuation) in enumerate(pairs):
        if len(context) == 0 or len(continuation) == 0:
            raise ValueError(f"pair {i}: context and continuation must both have tokens (give an empty context "
                             "as [end-of-text id])")
        if max_length is not None and len(continuation) > max_length:
            raise ValueError(f"pair {i}: the continuation has {len(continuation)} tokens, more than max_length="
                             f"{max_length}")
        whole = list(context) + list(continuation)
        # Inputs are whole[:-1]; the last len(continuation) positions predict the continuation.
        inputs = whole[:-1]
        if max_length is not None and len(inputs) > max_length:
            inputs = inputs[-max_length:]
        items.append((i, inputs, list(continuation)))
    items.sort(key=lambda item: -len(item[1]))
    results: list[tuple[float, bool] | None] = [None] * len(items)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            width = max(len(inp) for _, inp, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, (_, inp, _) in enumerate(chunk):
                ids[row, :len(inp)] = torch.as_tensor(inp)
            logprobs = F.log_softmax(model(ids.to(device)).logits.float(), dim=-1)
            for row, (index, inp, cont) in enumerate(chunk):
                n = len(cont)
                lp = logprobs[row, len(inp) - n:len(inp)]          # [n, V]
                target = torch.as_tensor(cont, device=lp.device)
                total = float(lp.gather(1, target[:, None]).sum())
                greedy = bool((lp.argmax(dim=-1) == target).all())
                results[index] = (total, greedy)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Windows that predict every token of ``tokens`` exactly once, each with as much context as fits.

    Returns (inputs, targets): the model reads ``inputs`` (at most ``max_length`` ids) and its last
    ``len(targets)`` positions predict ``targets``. The first token is predicted from ``prefix_token``
    (the end-of-text id); later windows end where the previous one stopped and reach back as far as
    ``max_length`` allows, so even the last, short window has full context.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    full = [prefix_token] + list(tokens)  # full[j] predicts full[j + 1]
    windows = []
    for start in range(0, len(tokens), max_length):   # this window predicts full[start + 1:end + 1]
        end = min(start + max_length, len(tokens))
        windows.append((full[max(0, end - max_length):end], full[start + 1:end + 1]))
    return windows


@torch.no_grad()
def rolling_loglikelihood(model: nn.Module, tokens: Sequence[int], prefix_token: int, max_length: int) -> float:
    """log p(tokens) (natural log) of a whole document, summed over :func:`rolling_windows`."""
    device = next(model.parameters()).device
    total = 0.0
    was_training = model.training
    model.eval()
    try:
        for inputs, targets in rolling_windows(tokens, prefix_token, max_length):
            n = len(targets)
            logits = model(torch.as_tensor([inputs], device=device)).logits[0, -n:]
            target = torch.as_tensor(targets, device=device)
            total += float(F.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).sum())
    finally:
        model.train(was_training)
    return total


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to (not including) the first occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


# --------------------------------------------------------------------------------------------------
# The lm-eval model class
# --------------------------------------------------------------------------------------------------

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as _error:  # the [eval] extra is not installed
    TemplateLM = object  # type: ignore[assignment,misc]
    _IMPORT_ERROR: ImportError | None = _error

    def register_model(*names: str):  # type: ignore[no-redef]
        return lambda cls: cls
else:
    _IMPORT_ERROR = None


@register_model(*REGISTERED_NAMES)
class SSMSuiteLM(TemplateLM):  # type: ignore[misc,valid-type]
    """lm-eval's model interface over an export folder (see the module docstring for the arguments)."""

    backend = "causal"

    def __init__(self, checkpoint: str, device: str | None = None, batch_size: int | str | None = 8,
                 max_length: int | str | None = None, dtype: str | None = None, **_: Any) -> None:
        if _IMPORT_ERROR is not None:
            raise ImportError("the lm-eval adapter needs lm-eval: pip install -e '.[eval]' "
                              f"(import failed: {_IMPORT_ERROR})")
        super().__init__()
        from core.checkpoint import load_export, read_export_info
        from domains.lm.evaluate import export_folder, pick_device
        from domains.lm.tokenizer import LMTokenizer

        folder = export_folder(str(checkpoint))
        info = read_export_info(folder)
        if info.tokenizer_path is None:
            raise FileNotFoundError(f"{folder} has no tokenizer.json; the harness needs the tokenizer the model "
                                    "was trained with")
        self.folder = Path(folder)
        self.tok = LMTokenizer.load(info.tokenizer_path)
        torch_dtype = None if dtype in (None, "auto") else getattr(torch, str(dtype))
        self._device = pick_device(str(device or "auto"))
        self.model = load_export(folder, device=self._device, dtype=torch_dtype)
        self.batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        config = info.config
        if max_length is None:
            trained = int(info.extra.get("seq_len") or 0)
            max_length = config.hyena.max_seqlen if "H" in config.pattern else max(2048, 8 * trained)
        self.max_length = int(max_length)
        if "H" in config.pattern and self.max_length > config.hyena.max_seqlen:
            raise ValueError(f"max_length={self.max_length} exceeds the Hyena filter's {config.hyena.max_seqlen} "
                             "positions; pass max_length <= that")

    # -- what TemplateLM needs --------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"ssm-suite-{self.tok.sha256[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tok.decode(list(tokens))

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = score_continuations(self.model, pairs, self.batch_size, self.max_length)
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            (text,) = request.args
            value = rolling_loglikelihood(self.model, self.tok.encode(text), self.eot_token_id, self.max_length)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), value)
            out.append(value)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out: list[str] = [""] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        for start in range(0, len(order), self.batch_size):
            indices = order[start:start + self.batch_size]
            # One generation per distinct gen_kwargs (lm-eval batches a task's requests, which share them).
            groups: dict[str, list[int]] = {}
            for i in indices:
                groups.setdefault(repr(sorted(requests[i].args[1].items())), []).append(i)
            for members in groups.values():
                kwargs = dict(requests[members[0]].args[1])
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.get("max_gen_toks", 256))
                sample = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
                temperature = float(kwargs.get("temperature", 1.0)) if sample else 0.0
                prompts = []
                for i in members:
                    ids = self.tok.encode(requests[i].args[0]) or [self.eot_token_id]
                    prompts.append(ids[-max(1, self.max_length - max_new):])
                result = generate(self.model, prompts, max_new_tokens=max_new, temperature=temperature,
                                  top_p=float(kwargs.get("top_p", 1.0)), top_k=int(kwargs.get("top_k", 0) or 0),
                                  seed=0, stop_tokens=[self.eot_token_id], pad_token_id=self.tok.pad_id)
                for i, seq in zip(members, result.sequences()):
                    text = self.tok.decode([t for t in seq if t != self.eot_token_id])
                    out[i] = cut_at_stop(text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def main() -> None:
    """lm-eval's command line with the ``ssm-suite`` model registered."""
    if _IMPORT_ERROR is not None:
        raise SystemExit(f"lm-eval is not installed ({_IMPORT_ERROR}); pip install -e '.[eval]'")
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
