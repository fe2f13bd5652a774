"""Training throughput of the 130M presets (tokens/s), ours beside mamba_ssm's MambaLMHeadModel.

    PYTHONPATH=. python3 scripts/bench_training.py [--presets mamba1-130m mamba2-130m] [--batch 8 --seq-len 2048]

One optimizer step = forward + backward + AdamW (fused) under bf16 autocast, fp32 weights, as the
training module runs it. Timed with CUDA events after warm-up; the median of the timed steps is reported.
mamba_ssm's model is built with the same shape (its own default config otherwise) when importable.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from core.backbone import CausalLM
from core.presets import get_preset


def time_steps(model: torch.nn.Module, batch: int, seq_len: int, vocab: int, steps: int, warmup: int,
               loss_fn) -> float:
    """Median seconds per optimizer step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), device="cuda")
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def profile_step(model: torch.nn.Module, batch: int, seq_len: int, vocab: int, loss_fn, label: str) -> None:
    """One more optimizer step under torch.profiler: the kernels by device time, grouped by name (so a
    model's time can be set against mamba_ssm's kernel by kernel)."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    print(f"\n{label}: one optimizer step's kernels by device time\n"
          + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=16, max_name_column_width=60),
          flush=True)


def ours_loss(model, inputs, labels):
    return model(inputs, labels=labels).loss


def mamba_ssm_loss(model, inputs, labels):
    logits = model(inputs).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def mamba_ssm_model(preset: str):
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except ImportError:
        return None
    config = get_preset(preset)
    layer = "Mamba1" if set(config.pattern) == {"S"} else "Mamba2" if set(config.pattern) == {"M"} else None
    if layer is None:
        return None
    ssm_cfg = {"layer": layer}
    if layer == "Mamba2":
        ssm_cfg.update(d_state=config.mamba2.d_state, headdim=config.mamba2.headdim,
                       chunk_size=config.mamba2.chunk_size, ngroups=config.mamba2.ngroups)
    cfg = MambaConfig(d_model=config.d_model, n_layer=len(config.pattern), vocab_size=config.vocab_size,
                      ssm_cfg=ssm_cfg, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                      pad_vocab_size_multiple=config.pad_vocab_size_multiple, tie_embeddings=True)
    return MambaLMHeadModel(cfg, device="cuda", dtype=torch.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["mamba1-130m", "mamba2-130m"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also print one step's kernels by device time")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_training needs a CUDA GPU")
    import os

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, B{args.batch} L{args.seq_len}, "
          f"bf16 autocast, SSD Triton design: {os.environ.get('SSM_SUITE_SSD_TRITON') or 'default'}")
    rows = []
    for preset in args.presets:
        config = get_preset(preset)
        model = CausalLM(config).cuda()
        tokens = args.batch * args.seq_len
        ours = time_steps(model, args.batch, args.seq_len, config.vocab_size, args.steps, args.warmup, ours_loss)
        if args.profile:
            profile_step(model, args.batch, args.seq_len, config.vocab_size, ours_loss, f"{preset} (ours)")
        del model
        torch.cuda.empty_cache()
        theirs = None
        baseline = mamba_ssm_model(preset)
        if baseline is not None:
            theirs = time_steps(baseline, args.batch, args.seq_len, config.vocab_size, args.steps, args.warmup,
                                mamba_ssm_loss)
            if args.profile:
                profile_step(baseline, args.batch, args.seq_len, config.vocab_size, mamba_ssm_loss,
                             f"{preset} (mamba_ssm)")
            del baseline
            torch.cuda.empty_cache()
        rows.append((preset, tokens / ours, None if theirs is None else tokens / theirs))
        print(f"{preset}: ours {tokens / ours:,.0f} tok/s"
              + ("" if theirs is None else f", mamba_ssm {tokens / theirs:,.0f} tok/s"), flush=True)
    print("\n| preset | ours tok/s | mamba_ssm tok/s | ours / mamba_ssm |\n|---|---|---|---|")
    for preset, ours, theirs in rows:
        ratio = "n/a" if theirs is None else f"{ours / theirs:.2f}"
        theirs_s = "n/a" if theirs is None else f"{theirs:,.0f}"
        print(f"| {preset} | {ours:,.0f} | {theirs_s} | {ratio} |")


if __name__ == "__main__":
    main()
