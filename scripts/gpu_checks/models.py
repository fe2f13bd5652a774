"""Whole-model cross-check against mamba_ssm: a random-init ``MambaLMHeadModel`` (the 130M Mamba-1 and
Mamba-2 shapes) converted into ours must give the same logits and the same training-step gradients.

For each model, one batch of random tokens runs three ways, each a forward (logits), a mean
cross-entropy on the next token and a backward:
  - mamba_ssm's model (its CUDA / Triton kernels), when importable;
  - ours, converted from its state dict by ``core.convert_hf.state_dict_from_mamba_ssm``, on the
    Triton kernels;
  - ours on the PyTorch ``chunked`` backend (no Triton): the independent reference of the first two.
Errors are ||a - b|| / ||b|| over the logits, and over all gradients (mamba_ssm's mapped to our names
by the same converter), in float32 (tight) and under bf16 autocast (the way models train; bf16
tolerance). A row passes when ours agrees with the chunked reference AND with mamba_ssm; the note
names which comparison failed. Run directly:
    PYTHONPATH=. python3 scripts/gpu_checks/models.py
On CPU (no mamba_ssm) ``SSM_SUITE_GPU_CHECK_SMOKE=1`` runs tiny shapes through the Triton interpreter.
"""

from __future__ import annotations

import dataclasses
import os

if os.environ.get("SSM_SUITE_GPU_CHECK_SMOKE") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch
import torch.nn.functional as F

from scripts.gpu_checks import rel

SMOKE = os.environ.get("SSM_SUITE_GPU_CHECK_SMOKE") == "1"
DEV = "cpu" if SMOKE else "cuda"
# The 130M shapes (mamba_ssm's configs for state-spaces/mamba-130m and mamba2-130m); tiny under smoke.
SHAPES = {
    "mamba1-130m": dict(d_model=768, n_layer=24, layer="Mamba1"),
    "mamba2-130m": dict(d_model=768, n_layer=24, layer="Mamba2"),
}
SMOKE_SHAPES = {
    "mamba1-tiny": dict(d_model=32, n_layer=2, layer="Mamba1"),
    "mamba2-tiny": dict(d_model=64, n_layer=2, layer="Mamba2"),
}
BATCH, SEQLEN = (2, 64) if SMOKE else (4, 1024)
VOCAB = 256 if SMOKE else 50277
TOL = {"float32": 2e-3, "bf16-autocast": 5e-2}


def _config_dict(shape: dict) -> dict:
    """A mamba_ssm ``MambaConfig`` as its config.json holds it."""
    ssm_cfg = {"layer": shape["layer"]}
    if shape["layer"] == "Mamba2" and shape["d_model"] < 128:
        ssm_cfg["headdim"] = 16  # the tiny smoke width: 2 * 64 / 16 = 8 heads
    return dict(d_model=shape["d_model"], d_intermediate=0, n_layer=shape["n_layer"], vocab_size=VOCAB,
                ssm_cfg=ssm_cfg, attn_layer_idx=[], attn_cfg={}, rms_norm=True, residual_in_fp32=True,
                fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True)


def _mamba_ssm_model(data: dict):
    """mamba_ssm's model of ``data`` on the GPU, fp32; None when mamba_ssm is not importable."""
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except Exception:  # noqa: BLE001  (not installed, or its extensions not built for this machine)
        return None
    fields = {f.name for f in dataclasses.fields(MambaConfig)}
    return MambaLMHeadModel(MambaConfig(**{k: v for k, v in data.items() if k in fields}), device=DEV,
                            dtype=torch.float32)


def _step(model, input_ids: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits (fp32) and the gradients of the next-token cross-entropy, by parameter name."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids)
    logits = (out.logits if hasattr(out, "logits") else out).float()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _grad_rel(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """||g - g_ref|| / ||g_ref|| over every parameter both name (one vector of all gradients)."""
    names = sorted(set(ours) & set(ref))
    if not names:
        return float("inf")
    a = torch.cat([ours[n].double().flatten() for n in names])
    b = torch.cat([ref[n].double().flatten() for n in names])
    return rel(a, b)


def _check_model(name: str, shape: dict) -> list[dict]:
    from core.checkpoint import build_model
    from core.convert_hf import config_from_mamba_ssm, state_dict_from_mamba_ssm
    from kernels.dispatch import forced_backend

    torch.manual_seed(0)
    data = _config_dict(shape)
    theirs = _mamba_ssm_model(data)
    config = config_from_mamba_ssm(data)
    if theirs is not None:
        state = {k: v.detach() for k, v in theirs.state_dict().items()}
        state = state_dict_from_mamba_ssm(data, state, config)
    else:  # no mamba_ssm: ours against the chunked reference only, from our own random init
        state = None
    ours = build_model(config, state, device=DEV, dtype=torch.float32, source=f"mamba_ssm {name}") \
        if state is not None else _random_ours(config)
    ours.train()
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQLEN), device=DEV)
    rows = []
    for mode in ("float32", "bf16-autocast"):
        autocast = mode != "float32"
        with forced_backend("triton"):
            logits, grads = _step(ours, input_ids, autocast)
        with forced_backend("chunked"):
            ref_logits, ref_grads = _step(ours, input_ids, autocast)
        errors = {"chunked": (rel(logits, ref_logits), _grad_rel(grads, ref_grads))}
        if theirs is not None:
            their_logits, their_grads = _step(theirs, input_ids, autocast)
            mapped = state_dict_from_mamba_ssm(data, their_grads, config)
            errors["mamba_ssm"] = (rel(logits, their_logits[..., : logits.shape[-1]]), _grad_rel(grads, mapped))
        tol = TOL[mode]
        failed = [who for who, (f, b) in errors.items() if not (f <= tol and b <= tol)]
        note = "; ".join(f"vs {who}: logits {f:.1e}, grads {b:.1e}" for who, (f, b) in errors.items())
        if theirs is None:
            note += "; mamba_ssm not importable"
        if failed:
            note += f"; FAILED against {', '.join(failed)}"
        worst_f = max(f for f, _ in errors.values())
        worst_b = max(b for _, b in errors.values())
        rows.append({"name": f"{name} ({mode}, tol {tol:g})", "shape": f"B{BATCH} L{SEQLEN}", "dtype": mode,
                     "err_fwd": worst_f, "err_bwd": worst_b, "pass": not failed, "note": note})
    del theirs, ours
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return rows


def _random_ours(config):
    from core.backbone import CausalLM

    return CausalLM(config).to(DEV)


def run_checks() -> list[dict]:
    rows = []
    for name, shape in (SMOKE_SHAPES if SMOKE else SHAPES).items():
        rows.extend(_check_model(name, shape))
    return rows


def run_bench() -> list[dict]:
    return []  # whole-model speed is scripts/bench_training.py's


if __name__ == "__main__":
    import sys

    sys.argv = [sys.argv[0], "--ops", "models"]
    from scripts.gpu_check import main

    main()
