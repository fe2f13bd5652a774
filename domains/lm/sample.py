"""``python -m domains.lm generate checkpoint=... prompt="..."``: sample continuations, streamed.

Prompts come from ``prompt`` (one) or ``prompts_file`` (one a line); they are generated as one batch
whatever their lengths. With one prompt and ``stream=true`` the tokens are printed as they come.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from core.checkpoint import load_export, read_export_info
from core.generate import generate
from domains.lm.evaluate import export_folder, pick_device
from domains.lm.tokenizer import LMTokenizer


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompts_file:
        path = Path(cfg.prompts_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file={cfg.prompts_file}: no such file")
        prompts = [line.rstrip("\n").replace("\\n", "\n") for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [p for p in prompts if p]
        if not prompts:
            raise ValueError(f"prompts_file={cfg.prompts_file} holds no prompt (one prompt a line)")
        return prompts
    if cfg.prompt is None:
        raise ValueError('give prompt="..." or prompts_file=<a file with one prompt a line>')
    return [str(cfg.prompt).replace("\\n", "\n")]


def sample(cfg: DictConfig) -> list[str]:
    folder = export_folder(cfg.checkpoint)
    info = read_export_info(folder)
    if info.tokenizer_path is None:
        raise FileNotFoundError(f"{folder} has no tokenizer.json: generate needs the tokenizer it was trained with")
    tokenizer = LMTokenizer.load(info.tokenizer_path)
    device = pick_device(cfg.device)
    model = load_export(folder, device=device)
    prompts = read_prompts(cfg)
    ids = [tokenizer.encode(p) or [tokenizer.eot_id] for p in prompts]
    stream = bool(cfg.stream) and len(prompts) == 1
    if stream:
        print(prompts[0], end="", flush=True)
    emitted: list[int] = []

    def on_token(step: int, token: torch.Tensor) -> None:
        if not stream:
            return
        # Decode the whole continuation each time: a byte-level BPE token may be half a character.
        before = tokenizer.decode(emitted)
        emitted.append(int(token[0]))
        if emitted[-1] != tokenizer.eot_id:
            print(tokenizer.decode(emitted)[len(before):], end="", flush=True)

    started = time.perf_counter()
    out = generate(model, ids, max_new_tokens=int(cfg.max_new_tokens), temperature=float(cfg.temperature),
                   top_k=int(cfg.top_k), top_p=float(cfg.top_p), seed=int(cfg.seed),
                   stop_tokens=[tokenizer.eot_id] if cfg.stop_at_eot else [], pad_token_id=tokenizer.pad_id,
                   on_token=on_token)
    elapsed = time.perf_counter() - started
    texts = [tokenizer.decode([t for t in seq if t != tokenizer.eot_id]) for seq in out.sequences()]
    if stream:
        print()
    else:
        for prompt, text in zip(prompts, texts):
            print(f"--- {prompt!r}\n{prompt}{text}\n")
    new_tokens = int(out.lengths.sum())
    print(f"[{new_tokens} new tokens in {elapsed:.2f} s: {new_tokens / elapsed:.1f} tok/s, batch {len(prompts)}]",
          file=sys.stderr)
    return texts
