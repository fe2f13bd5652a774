"""GPU checks and timings for SSD's Triton backend (kernels/ssd/triton.py).

``run_checks()``: the Triton forward and backward at real shapes against the chunked PyTorch form run in
float64 on the GPU (itself tested against the sequential reference on CPU), with packed sequences,
initial/final states, a >2^31-element input (64-bit offsets), the step kernel, and bit-identical
gradients on re-run. ``run_bench()``: forward and forward+backward times against mamba_ssm's
``mamba_chunk_scan_combined`` (when importable) at the target shapes.

Run directly on the GPU machine: ``python -m scripts.gpu_checks.ssd`` (prints both tables).
"""

from __future__ import annotations

import os
import sys

import torch

from kernels.ssd import triton as sst
from kernels.ssd.chunked import ssd_chunked
from kernels.ssd.reference import ssd_step_reference

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(batch, L, H, P, G, N, dtype, states=None, init=True, D_per_dim=False, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    return dict(
        x=randn(batch, L, H, P), dt=randn(batch, L, H) - 2.0,  # dt ~ softplus(N(-2, 1)): Mamba-2-like steps
        A=-(torch.rand(H, generator=gen, device="cuda") * 15 + 1),
        B=randn(batch, L, G, N), C=randn(batch, L, G, N),
        D=randn(H, P) if D_per_dim else randn(H).float(), z=randn(batch, L, H, P),
        dt_bias=randn(H, scale=0.5).float(),
        initial_state=randn(batch if states is None else states, H, P, N).float() if init else None,
    )


def _call(fn, i, chunk=256, **kw):
    return fn(i["x"], i["dt"], i["A"], i["B"], i["C"], chunk, D=i["D"], z=i["z"], dt_bias=i["dt_bias"],
              dt_softplus=True, initial_state=i["initial_state"], return_final_state=True, **kw)


def _check_scan(name, shape, dtype, cu=None, states=None, D_per_dim=False, tol=None):
    batch, L, H, P, G, N = shape
    i = _inputs(batch, L, H, P, G, N, dtype, states=states, D_per_dim=D_per_dim)
    names = [k for k in NAMES if i[k] is not None]
    for k in names:
        i[k].requires_grad_(True)
    ref = {k: i[k].detach().double().requires_grad_(True) for k in names}
    ref.update({k: None for k in NAMES if i[k] is None})
    y, f = _call(sst.ssd_triton, i, cu_seqlens=cu)
    y_ref, f_ref = _call(ssd_chunked, ref, chunk=64, cu_seqlens=cu)
    gy, gf = torch.randn_like(y_ref), torch.randn_like(f_ref)
    grads = torch.autograd.grad((y * gy.to(y.dtype)).sum() + (f * gf.float()).sum(), [i[k] for k in names])
    y2, f2 = _call(sst.ssd_triton, i, cu_seqlens=cu)
    grads2 = torch.autograd.grad((y2 * gy.to(y.dtype)).sum() + (f2 * gf.float()).sum(), [i[k] for k in names])
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (f_ref * gf).sum(), [ref[k] for k in names])
    fwd = max(_rel(y, y_ref), _rel(f, f_ref))
    bwd = {k: _rel(g, r) for k, g, r in zip(names, grads, grads_ref)}
    deterministic = all(torch.equal(a, b) for a, b in zip(grads, grads2))
    finite = all(torch.isfinite(g).all().item() for g in grads)
    tol = tol or (5e-3 if dtype == torch.float32 else 2e-2)  # float32: tf32 matrix products
    worst = max(bwd, key=bwd.get)
    ok = fwd < tol and bwd[worst] < tol and deterministic and finite
    return dict(name=name, shape=str(shape) + (f" cu={cu.tolist()}" if cu is not None else ""),
                dtype=str(dtype).replace("torch.", ""), fwd_rel=fwd, bwd_rel=bwd[worst], worst_grad=worst,
                deterministic=deterministic, passed=ok)


def _check_large_offsets():
    """x with more than 2^31 elements: the last row must equal that row run alone (small offsets)."""
    batch, L, H, P, G, N = 5, 262144, 32, 64, 1, 64  # 5 * 2^18 * 2048 = 2.7e9 elements of x
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(batch, L, H, P, generator=gen, device="cuda", dtype=torch.bfloat16)
    dt = torch.randn(batch, L, H, generator=gen, device="cuda", dtype=torch.bfloat16) - 2
    A = -torch.rand(H, device="cuda") * 4 - 1
    B = torch.randn(batch, L, G, N, generator=gen, device="cuda", dtype=torch.bfloat16)
    C = torch.randn(batch, L, G, N, generator=gen, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y, f = sst.ssd_triton(x, dt, A, B, C, 256, dt_softplus=True, return_final_state=True)
        y1, f1 = sst.ssd_triton(x[-1:].clone(), dt[-1:].clone(), A, B[-1:].clone(), C[-1:].clone(), 256,
                                dt_softplus=True, return_final_state=True)
    err = max(_rel(y[-1:], y1), _rel(f[-1:], f1))
    del x, y, B, C
    torch.cuda.empty_cache()
    return dict(name="64-bit offsets (fwd, last row vs alone)", shape=str((batch, L, H, P, G, N)),
                dtype="bfloat16", fwd_rel=err, bwd_rel=float("nan"), worst_grad="-", deterministic=True,
                passed=err < 1e-6)


def _check_step():
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        batch, H, P, G, N = 16, 32, 64, 2, 128
        x, z = torch.randn(batch, H, P, device="cuda").to(dtype), torch.randn(batch, H, P, device="cuda").to(dtype)
        dt = torch.randn(batch, H, device="cuda").to(dtype)
        B, C = (torch.randn(batch, G, N, device="cuda").to(dtype) for _ in range(2))
        A, D, bias = -torch.rand(H, device="cuda") * 8, torch.randn(H, device="cuda"), torch.randn(H, device="cuda")
        state = torch.randn(batch, H, P, N, device="cuda")
        state_ref = state.double()
        y = sst.ssd_step_triton(state, x, dt, A, B, C, D, z, bias, True)
        y_ref = ssd_step_reference(state_ref, x.double(), dt.double(), A.double(), B.double(), C.double(),
                                   D.double(), z.double(), bias.double(), True)
        err = max(_rel(y, y_ref), _rel(state, state_ref))
        rows.append(dict(name="ssd_step", shape=str((batch, H, P, G, N)), dtype=str(dtype).replace("torch.", ""),
                         fwd_rel=err, bwd_rel=float("nan"), worst_grad="-", deterministic=True,
                         passed=err < (1e-4 if dtype == torch.float32 else 1e-2)))
    return rows


def run_checks() -> list[dict]:
    rows = []
    cu = torch.tensor([0, 100, 1100, 1101, 2047, 2500], device="cuda")
    for name, shape, dtype, kw in [
        ("scan", (2, 2047, 24, 64, 1, 128), torch.bfloat16, {}),
        ("scan", (2, 1000, 8, 64, 2, 128), torch.float32, {"D_per_dim": True}),
        ("scan", (1, 4097, 4, 128, 4, 256), torch.float16, {}),
        ("scan", (2, 1, 4, 64, 1, 64), torch.float32, {}),
        ("scan varlen", (1, 2500, 16, 64, 2, 128), torch.bfloat16, {"cu": cu, "states": 5}),
    ]:
        rows.append(_check_scan(name, shape, dtype, **kw))
    saved = sst.MAX_CHUNK
    sst.MAX_CHUNK = 128  # the 128-token chunk variant (tiles twice as large) must be right too
    try:
        rows.append(_check_scan("scan (T=128)", (2, 2047, 24, 64, 1, 128), torch.bfloat16))
    finally:
        sst.MAX_CHUNK = saved
    rows += _check_step()
    rows.append(_check_large_offsets())
    return rows


def _bench_one(shape, dtype=torch.bfloat16, chunk=256):
    import triton

    batch, L, H, P, G, N = shape
    i = _inputs(batch, L, H, P, G, N, dtype, init=False)
    for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias"):
        i[k].requires_grad_(True)
    gy = torch.randn(batch, L, H, P, device="cuda", dtype=dtype)

    def ours():
        return sst.ssd_triton(i["x"], i["dt"], i["A"], i["B"], i["C"], chunk, D=i["D"], z=i["z"],
                              dt_bias=i["dt_bias"], dt_softplus=True)

    def fb(fn):
        def run():
            y = fn()
            torch.autograd.backward(y, gy)
        return run

    rows = {}
    with torch.no_grad():
        rows["ours_fwd_ms"] = triton.testing.do_bench(ours, warmup=50, rep=300, return_mode="median")
    rows["ours_fwdbwd_ms"] = triton.testing.do_bench(fb(ours), warmup=50, rep=300, return_mode="median",
                                                     grad_to_none=[i[k] for k in i if i[k] is not None])
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        def theirs():
            return mamba_chunk_scan_combined(i["x"], i["dt"], i["A"], i["B"], i["C"], chunk, D=i["D"], z=i["z"],
                                             dt_bias=i["dt_bias"], dt_softplus=True)
        with torch.no_grad():
            rows["mamba_fwd_ms"] = triton.testing.do_bench(theirs, warmup=50, rep=300, return_mode="median")
        rows["mamba_fwdbwd_ms"] = triton.testing.do_bench(fb(theirs), warmup=50, rep=300, return_mode="median",
                                                          grad_to_none=[i[k] for k in i if i[k] is not None])
        yo, yt = ours(), theirs()
        rows["rel_vs_mamba"] = _rel(yo, yt)
    except ImportError as err:
        rows["mamba"] = f"not importable: {err}"
    # Compulsory traffic: x, z, dt, B, C read and y written (fwd); plus dy read and dx, dz, ddt, dB, dC
    # written and the inputs re-read (bwd).
    el = dtype.itemsize
    fwd_bytes = batch * L * (3 * H * P + H + 2 * G * N) * el
    rows["fwd_GBps"] = fwd_bytes / rows["ours_fwd_ms"] / 1e6
    return rows


def run_bench() -> list[dict]:
    out = []
    for shape in [(8, 2048, 24, 64, 1, 128), (2, 16384, 32, 64, 1, 128)]:
        for max_chunk in (64, 128) if os.environ.get("SSD_SWEEP") else (sst.MAX_CHUNK,):
            saved = sst.MAX_CHUNK
            sst.MAX_CHUNK = max_chunk
            try:
                r = _bench_one(shape)
            finally:
                sst.MAX_CHUNK = saved
            row = dict(kernel=f"ssd fwd+bwd (T={max_chunk})", shape=str(shape), dtype="bfloat16", **r)
            if "mamba_fwdbwd_ms" in r:
                row["ratio_fwd"] = r["ours_fwd_ms"] / r["mamba_fwd_ms"]
                row["ratio_fwdbwd"] = r["ours_fwdbwd_ms"] / r["mamba_fwdbwd_ms"]
            out.append(row)
    return out


def _profile(shape=(8, 2048, 24, 64, 1, 128)):
    """Per-kernel CUDA times of one forward+backward (printed; helps see what bounds the total)."""
    batch, L, H, P, G, N = shape
    i = _inputs(batch, L, H, P, G, N, torch.bfloat16, init=False)
    for k in ("x", "dt", "B", "C", "z"):
        i[k].requires_grad_(True)
    gy = torch.randn(batch, L, H, P, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.autograd.backward(sst.ssd_triton(i["x"], i["dt"], i["A"], i["B"], i["C"], 256, D=i["D"], z=i["z"],
                                               dt_bias=i["dt_bias"], dt_softplus=True), gy)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            torch.autograd.backward(sst.ssd_triton(i["x"], i["dt"], i["A"], i["B"], i["C"], 256, D=i["D"],
                                                   z=i["z"], dt_bias=i["dt_bias"], dt_softplus=True), gy)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


def _table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = (lambda v: f"{v:.3g}" if isinstance(v, float) else str(v))
    lines = [" | ".join(keys)] + [" | ".join(fmt(r.get(k, "")) for k in keys) for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, file=sys.stderr)
    what = sys.argv[1:] or ["checks", "bench", "profile"]
    if "profile" in what:
        _profile()
    if "checks" in what:
        print(_table(run_checks()), flush=True)
    if "bench" in what:
        print(_table(run_bench()), flush=True)
