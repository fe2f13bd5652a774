"""``python -m domains.lm generate checkpoint=... prompt="..."``: sample continuations, streamed.

Prompts come from ``prompt`` (one) or ``prompts_file`` (one a line); they are generated as one batch
whatever their lengths (left-padded, see ``core.generate``). With one prompt and ``stream=true`` the text
is printed as the tokens arrive: :class:`core.generate.StreamingDetokenizer` decodes a short window of
tokens and holds back a piece until its characters are complete (a byte-level BPE token may be half a
character), so the streamed text equals the final decode.

On CUDA the decoding steps replay a CUDA graph (``cuda_graph=auto``); ``dtype`` casts the model (e.g.
``dtype=bfloat16`` for fast GPU decoding); ``prefill_chunk_size`` bounds the prefill's memory for long
prompts; ``ssm_state_dtype=bfloat16`` keeps the Mamba layers' states in 16 bits (half their memory).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from core.checkpoint import load_export, read_export_info
from core.generate import StreamingDetokenizer, generate
from domains.lm.evaluate import export_folder, pick_device
from domains.lm.tokenizer import LMTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def model_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "", "null"):
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not one of {sorted(DTYPES)} (or null: the checkpoint's dtype)")
    return DTYPES[name]


def cuda_graph_mode(value: object) -> bool | str:
    if value in (True, False, "auto"):
        return value
    raise ValueError(f"cuda_graph={value!r}: choose auto (graphs on CUDA), true or false")


def state_dtype(name: object) -> torch.dtype | None:
    """``ssm_state_dtype``: null (float32 Mamba states) or a 16-bit dtype's name (half the state, rounded
    once a token, as mamba_ssm keeps it)."""
    if name is None or name == "float32":
        return None
    if name not in ("bfloat16", "float16"):
        raise ValueError(f"ssm_state_dtype={name!r}: choose null (float32), bfloat16 or float16")
    return DTYPES[name]


def sample(cfg: DictConfig) -> list[str]:
    ssm_state_dtype = state_dtype(cfg.get("ssm_state_dtype"))  # a typo fails before the model loads
    folder = export_folder(cfg.checkpoint)
    info = read_export_info(folder)
    if info.tokenizer_path is None:
        raise FileNotFoundError(f"{folder} has no tokenizer.json: generate needs the tokenizer it was trained with")
    tokenizer = LMTokenizer.load(info.tokenizer_path)
    device = pick_device(cfg.device)
    model = load_export(folder, device=device, dtype=model_dtype(cfg.get("dtype")))
    prompts = read_prompts(cfg)
    ids = [tokenizer.encode(p) or [tokenizer.eot_id] for p in prompts]
    stream = bool(cfg.stream) and len(prompts) == 1
    if stream:
        print(prompts[0], end="", flush=True)
    detokenizer = StreamingDetokenizer(tokenizer.decode)
    stopped = False

    def on_token(step: int, token: torch.Tensor) -> None:
        nonlocal stopped
        value = int(token[0])
        if stopped or (cfg.stop_at_eot and value == tokenizer.eot_id):
            stopped = True  # the stop token is not printed, nor the pads after it
            return
        print(detokenizer.push(value), end="", flush=True)

    chunk = cfg.get("prefill_chunk_size")
    started = time.perf_counter()
    out = generate(model, ids, max_new_tokens=int(cfg.max_new_tokens), temperature=float(cfg.temperature),
                   top_k=int(cfg.top_k), top_p=float(cfg.top_p), seed=int(cfg.seed),
                   stop_tokens=[tokenizer.eot_id] if cfg.stop_at_eot else [], pad_token_id=tokenizer.pad_id,
                   prefill_chunk_size=int(chunk) if chunk else None,
                   on_token=on_token if stream else None,
                   cuda_graph=cuda_graph_mode(cfg.get("cuda_graph", "auto")),
                   ssm_state_dtype=ssm_state_dtype)
    elapsed = time.perf_counter() - started
    texts = [tokenizer.decode([t for t in seq if t != tokenizer.eot_id]) for seq in out.sequences()]
    if stream:
        print(detokenizer.flush())
    else:
        for prompt, text in zip(prompts, texts):
            print(f"--- {prompt!r}\n{prompt}{text}\n")
    new_tokens = int(out.lengths.sum())
    graph = ", CUDA graph" if out.cuda_graph else ""
    print(f"[{new_tokens} new tokens in {elapsed:.2f} s: {new_tokens / elapsed:.1f} tok/s, batch {len(prompts)}"
          f"{graph}]", file=sys.stderr)
    return texts
