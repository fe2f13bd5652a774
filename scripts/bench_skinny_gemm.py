"""Skinny matmuls of the batch-64 decoding step: Triton tiles against cuBLAS, each in a CUDA graph.

The batch-64 Mamba-1 step spends ~14 us a layer in three cuBLAS calls at M = 64 (in_proj 768 -> 3072,
x_proj 1536 -> 80, out_proj 1536 -> 768) whose weights take ~2.5 us to stream. This script measures
whether Triton tiles that spread the weight bytes over more programs do better: every shape is timed as
24 launches in one CUDA graph, each on its own weight copy (more bytes than L2 holds, as in the model),
and as the model's chain in_proj -> x_proj / out_proj over 24 layers.

Usage (GPU): python3 scripts/bench_skinny_gemm.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.pdl import pdl_enabled, prefetch_rows_l2, wait_for_prior_kernel  # noqa: E402
from scripts.gpu_checks import compile_only_launches  # noqa: E402


@triton.jit
def _mm(x_ptr, w_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_ym, stride_yk,
        K: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        STAGES: tl.constexpr, PDL: tl.constexpr, LINE: tl.constexpr, LP: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rmask = rows < M
    nmask = cols < N
    KS: tl.constexpr = K // SPLIT
    k_lo = pid_k * KS
    prefetch_rows_l2(w_ptr + k_lo, cols, nmask, stride_wn, KS, LINE, LP, PDL)
    wait_for_prior_kernel(PDL)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in tl.range(0, KS, BK, num_stages=STAGES):
        k = k_lo + k0 + tl.arange(0, BK)
        a = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=rmask[:, None], other=0.0)
        b = tl.load(w_ptr + cols[:, None] * stride_wn + k[None, :], mask=nmask[:, None], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
    out = y_ptr + pid_k * stride_yk + rows[:, None] * stride_ym + cols[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


def triton_linear(x: torch.Tensor, w: torch.Tensor, cfg: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T; SPLIT > 1 returns float32 partials [SPLIT, M, N]."""
    M, K = x.shape
    N = w.shape[0]
    split = cfg["SPLIT"]
    if out is None:
        out = (torch.empty(M, N, device=x.device, dtype=x.dtype) if split == 1
               else torch.empty(split, M, N, device=x.device, dtype=torch.float32))
    pdl = cfg.get("PDL", False) and pdl_enabled(x.device)
    line = 64
    lp = triton.next_power_of_2(triton.cdiv(K // split, line))
    grid = (triton.cdiv(N, cfg["BN"]), triton.cdiv(M, cfg["BM"]), split)
    _mm[grid](x, w, out, M, N, x.stride(0), w.stride(0), out.stride(-2), out.stride(0) if split > 1 else 0,
              K=K, SPLIT=split, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], STAGES=cfg["STAGES"], PDL=pdl,
              LINE=line, LP=lp, num_warps=cfg["WARPS"], launch_pdl=pdl)
    return out


def graph_us(fn, launches: int, replays: int = 50) -> float:
    """Microseconds per launch of ``fn`` (which makes ``launches`` launches) replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / replays / launches)
    return sorted(times)[len(times) // 2]


def sweep(name: str, M: int, N: int, K: int, layers: int, quick: bool) -> list[tuple[float, dict]]:
    dev = torch.device("cuda")
    xs = [torch.randn(M, K, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
    ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5 for _ in range(layers)]
    ref = [torch.nn.functional.linear(x, w) for x, w in zip(xs, ws)]
    cublas = graph_us(lambda: [torch.nn.functional.linear(x, w) for x, w in zip(xs, ws)], layers)
    print(f"\n## {name}: M={M} N={N} K={K}, {layers} weight copies ({layers * N * K * 2 / 1e6:.0f} MB)")
    print(f"cuBLAS: {cublas:.2f} us/launch (weight bytes alone: {N * K * 2 / 3.0e6:.2f} us at 3 TB/s)")
    results = []
    bms = [64] if quick else [32, 64]
    bns = [16, 32, 64] if N >= 64 else [16, 32]
    splits = [1] if N >= 512 else [1, 2, 4, 8]
    cfgs = [dict(BM=bm, BN=bn, BK=bk, WARPS=warps, STAGES=stages, SPLIT=split, PDL=pdl)
            for bm, bn, bk, warps, stages, split, pdl in itertools.product(
                bms, bns, [64, 128], [4] if quick else [4, 8], [3, 5], splits, [False, True])
            if bm <= M and (K // split) % bk == 0]
    with compile_only_launches():  # every tile compiled in parallel first
        for cfg in cfgs:
            try:
                triton_linear(xs[0], ws[0], cfg)
            except Exception:  # noqa: BLE001  (reported below)
                pass
    for cfg in cfgs:
        try:
            outs = [triton_linear(x, w, cfg) for x, w in zip(xs, ws)]
            got = outs[0] if cfg["SPLIT"] == 1 else outs[0].sum(0).to(torch.bfloat16)
            err = ((got.float() - ref[0].float()).norm() / ref[0].float().norm()).item()
            if err > 1e-2:
                print(f"  WRONG {cfg}: rel err {err:.2e}")
                continue
            us = graph_us(lambda: [triton_linear(x, w, cfg) for x, w in zip(xs, ws)], layers)
        except Exception as exc:  # noqa: BLE001  (resources a tile cannot have: skip the tile)
            print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        results.append((us, cfg))
    results.sort(key=lambda r: r[0])
    for us, cfg in results[:8]:
        print(f"  {us:6.2f} us  {cfg}  ({cublas / us:.2f}x cuBLAS)")
    return results


def chain(layers: int, best: dict[str, dict]) -> None:
    """The step's three matmuls over ``layers`` layers, each layer on its own weights."""
    dev = torch.device("cuda")
    M, D, DI, J = 64, 768, 1536, 80
    w_in = [torch.randn(2 * DI, D, device=dev, dtype=torch.bfloat16) / D ** 0.5 for _ in range(layers)]
    w_x = [torch.randn(J, DI, device=dev, dtype=torch.bfloat16) / DI ** 0.5 for _ in range(layers)]
    w_out = [torch.randn(D, DI, device=dev, dtype=torch.bfloat16) / DI ** 0.5 for _ in range(layers)]
    h0 = torch.randn(M, D, device=dev, dtype=torch.bfloat16)

    def run(linear_in, linear_x, linear_out):
        h = h0
        for i in range(layers):
            u = linear_in(h, w_in[i])
            xc = u[:, :DI].contiguous()
            linear_x(xc, w_x[i])
            h = linear_out(xc, w_out[i])
        return h

    f = torch.nn.functional.linear
    cublas = graph_us(lambda: run(f, f, f), layers)
    ours = graph_us(lambda: run(*(lambda x, w, c=best[k]: triton_linear(x, w, c) for k in ("in", "x", "out"))), layers)
    print(f"\n## chain in_proj -> copy -> x_proj, out_proj over {layers} layers, per layer")
    print(f"cuBLAS {cublas:.2f} us, Triton {ours:.2f} us ({cublas / ours:.2f}x)")


def scan_state_dtype(layers: int) -> None:
    """The batch-64 scan step (``mamba1_scan_step``'s kernel) with a float32 and a bfloat16 state."""
    from kernels.mamba_decode.triton import _scan_kernel, tiles

    dev = torch.device("cuda")
    B, DI, N, R = 64, 1536, 16, 48
    cfg = tiles(B, 1, DI, N, R, 2)
    wd = torch.randn(DI, R, device=dev, dtype=torch.bfloat16) / R ** 0.5
    dtb = torch.randn(DI, device=dev)
    A = -torch.rand(DI, N, device=dev)
    D = torch.randn(DI, device=dev)
    x, z = (torch.randn(B, DI, device=dev, dtype=torch.bfloat16) for _ in range(2))
    xdbl = torch.randn(B, R + 2 * N, device=dev, dtype=torch.bfloat16)
    y = torch.empty(B, DI, device=dev, dtype=torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16):
        states = [torch.randn(B, DI, N, device=dev).to(dtype) for _ in range(layers)]

        def run():
            for st in states:
                _scan_kernel[(triton.cdiv(DI, cfg["BD"]), triton.cdiv(B, cfg["BB2"]))](
                    xdbl, wd, dtb, A, D, x, z, st, y, B, 0, xdbl.stride(0), xdbl.stride(1), *wd.stride(),
                    *A.stride(), x.stride(0), z.stride(0), *st.stride(), y.stride(0),
                    DI=DI, R=R, N=N, NP=1, HAS_D=True, DOT=cfg["DOT2"], IEEE=False, BB=cfg["BB2"], BD=cfg["BD"],
                    BR=cfg["BR"], BN=cfg["BNS"], BP=1, PRE=False, PDL=False, num_warps=cfg["warps2"])

        print(f"scan step, batch 64, state {dtype}: {graph_us(run, layers):.2f} us/layer")


def fused_pieces(layers: int = 24) -> None:
    """x_proj (split-K, last program reduces) and in_proj + conv step, against cuBLAS (+ the conv kernel)."""
    from kernels.causal_conv1d import causal_conv1d_step
    from kernels.mamba_decode.triton_large import in_proj_conv, xproj

    dev = torch.device("cuda")
    B, D, DI, J, W = 64, 768, 1536, 80, 4
    xs = [torch.randn(B, DI, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
    wx = [torch.randn(J, DI, device=dev, dtype=torch.bfloat16) / DI ** 0.5 for _ in range(layers)]
    f = torch.nn.functional.linear
    ref = f(xs[0], wx[0])
    cublas = graph_us(lambda: [f(x, w) for x, w in zip(xs, wx)], layers)
    print(f"\n## x_proj B={B} J={J} DI={DI}: cuBLAS {cublas:.2f} us")
    res = []
    grid = list(itertools.product([4, 8, 12, 16], [16, 32, 64], [16, 32], [64, 128], [4], [False, True]))
    with compile_only_launches():
        for split, bb, bj, bk, warps, pdl in grid:
            xproj(xs[0], wx[0], dict(SPLIT=split, BB=bb, BJ=bj, BK=bk, WARPS=warps), pdl)
    for split, bb, bj, bk, warps, pdl in grid:
        cfg = dict(SPLIT=split, BB=bb, BJ=bj, BK=bk, WARPS=warps)
        try:
            outs = [xproj(xs[0], wx[0], cfg, pdl) for _ in range(3)]
            err = max((o.float() - ref.float()).abs().max().item() for o in outs)
            same = all(torch.equal(outs[0], o) for o in outs)
            us = graph_us(lambda: [xproj(x, w, cfg, pdl) for x, w in zip(xs, wx)], layers)
            again = xproj(xs[0], wx[0], cfg, pdl)
        except Exception as exc:  # noqa: BLE001
            print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        res.append((us, cfg, pdl, err, same and torch.equal(again, outs[0])))
    res.sort(key=lambda r: r[0])
    for us, cfg, pdl, err, same in res[:10]:
        print(f"  {us:6.2f} us  {cfg} pdl={pdl}  max abs err {err:.2e} repeatable {same}  ({cublas / us:.2f}x)")
    print(f"  worst error over all tiles {max(r[3] for r in res):.2e}, all repeatable: {all(r[4] for r in res)}")

    hs = [torch.randn(B, D, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
    wi = [torch.randn(2 * DI, D, device=dev, dtype=torch.bfloat16) / D ** 0.5 for _ in range(layers)]
    cw = [torch.randn(DI, W, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
    cb = [torch.randn(DI, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
    cs = [torch.randn(B, DI, W - 1, device=dev, dtype=torch.bfloat16) for _ in range(layers)]

    def op_by_op():
        for i in range(layers):
            xr, zr = f(hs[i], wi[i]).chunk(2, dim=-1)
            causal_conv1d_step(xr, cs[i], cw[i], cb[i], "silu")

    base = graph_us(op_by_op, layers)
    s0, s1 = cs[0].clone(), cs[0].clone()
    xr, zr = f(hs[0], wi[0]).chunk(2, dim=-1)
    yr = causal_conv1d_step(xr, s0, cw[0], cb[0], "silu")
    print(f"\n## in_proj + conv step B={B}: cuBLAS + conv kernel {base:.2f} us")
    res = []
    grid = list(itertools.product([32, 64], [16, 32, 64], [64, 128], [3, 5], [4, 8], [False, True]))
    with compile_only_launches():
        for bb, bc, bk, stages, warps, pdl in grid:
            in_proj_conv(hs[0], wi[0], cw[0], cb[0], s1, dict(BB=bb, BC=bc, BK=bk, STAGES=stages, WARPS=warps), pdl)
    for bb, bc, bk, stages, warps, pdl in grid:
        cfg = dict(BB=bb, BC=bc, BK=bk, STAGES=stages, WARPS=warps)
        try:
            s1.copy_(cs[0])
            xc, z = in_proj_conv(hs[0], wi[0], cw[0], cb[0], s1, cfg, pdl)
            err = max((xc.float() - yr.float()).abs().max().item(), (z.float() - zr.float()).abs().max().item(),
                      (s1.float() - s0.float()).abs().max().item())
            us = graph_us(lambda: [in_proj_conv(hs[i], wi[i], cw[i], cb[i], cs[i], cfg, pdl) for i in range(layers)],
                          layers)
        except Exception as exc:  # noqa: BLE001
            print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        res.append((us, cfg, pdl, err))
    res.sort(key=lambda r: r[0])
    for us, cfg, pdl, err in res[:10]:
        print(f"  {us:6.2f} us  {cfg} pdl={pdl}  max abs err {err:.2e}  ({base / us:.2f}x)")
    print(f"  worst error over all tiles {max(r[3] for r in res):.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tiles")
    parser.add_argument("--gemm", action="store_true", help="the plain matmul tile sweep")
    args = parser.parse_args()
    if not args.gemm:
        fused_pieces()
        return
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    scan_state_dtype(24)
    best1 = {}
    for key, name, M, N, K in (("in", "in_proj", 64, 3072, 768), ("out", "out_proj", 64, 768, 1536),
                               ("x", "x_proj", 64, 80, 1536), ("head", "lm_head", 64, 50304, 768)):
        layers = 4 if key == "head" else 24
        results = sweep(name, M, N, K, layers, args.quick or key == "head")
        best1[key] = next((cfg for _, cfg in results if cfg["SPLIT"] == 1), None)
    if all(best1[k] for k in ("in", "x", "out")):
        chain(24, best1)


if __name__ == "__main__":
    main()
