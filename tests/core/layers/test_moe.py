"""MoE: grouped dispatch against a token-by-token dense loop, aux losses by hand, capacity dropping,
padding, the grouped-GEMM backend, and Jamba's sparse MoE block."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.config import MoEConfig
from core.layers.moe import MoE, grouped_mm_function


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def make(d_model=16, dtype=torch.float64, seed=0, **kwargs) -> MoE:
    torch.manual_seed(seed)
    kwargs.setdefault("hidden_size", 24)
    m = MoE(d_model, MoEConfig(**kwargs), dtype=dtype)
    # Larger router weights than the default init: distinct, confident routing decisions.
    with torch.no_grad():
        m.router.weight.mul_(4)
    return m


def expert_mlp(m: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    ex = m.experts
    up = x @ ex.up_proj[e].T
    hidden = F.silu(x @ ex.gate_proj[e].T) * up if ex.activation == "swiglu" else F.gelu(up)
    return hidden @ ex.down_proj[e].T


def naive_moe(m: MoE, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Every real token through its top-k experts, one token at a time, in token order; an expert
    past its capacity skips the assignment."""
    tokens = x.reshape(-1, x.shape[-1])
    real = [True] * tokens.shape[0] if padding_mask is None else padding_mask.reshape(-1).tolist()
    n_real = sum(real)
    capacity = None if m.capacity_factor is None else math.ceil(m.capacity_factor * n_real * m.top_k / m.n_experts)
    used = [0] * m.n_experts
    out = []
    for t in range(tokens.shape[0]):
        y = torch.zeros_like(tokens[t])
        if real[t]:
            probs = torch.softmax(tokens[t] @ m.router.weight.T, dim=-1)
            weights, experts = probs.topk(m.top_k)
            if m.renormalize:
                weights = weights / weights.sum()
            for w, e in zip(weights, experts.tolist()):
                if capacity is not None and used[e] >= capacity:
                    continue
                used[e] += 1
                y = y + w * expert_mlp(m, e, tokens[t])
        out.append(y)
    return torch.stack(out).view_as(x)


def hand_aux(m: MoE, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[float, float]:
    tokens = x.reshape(-1, x.shape[-1]).detach()
    if padding_mask is not None:
        tokens = tokens[padding_mask.reshape(-1)]
    logits = tokens @ m.router.weight.detach().T
    n_tokens = tokens.shape[0]
    counts = [0] * m.n_experts
    prob_sum = [0.0] * m.n_experts
    z = 0.0
    for t in range(n_tokens):
        probs = torch.softmax(logits[t], -1)
        for e in probs.topk(m.top_k).indices.tolist():
            counts[e] += 1
        for e in range(m.n_experts):
            prob_sum[e] += probs[e].item()
        z += math.log(sum(math.exp(v) for v in logits[t].tolist())) ** 2
    balance = m.n_experts * sum(counts[e] / (n_tokens * m.top_k) * prob_sum[e] / n_tokens
                                for e in range(m.n_experts))
    return m.load_balancing_coef * balance, m.z_loss_coef * z / n_tokens


@pytest.mark.parametrize("n_experts,top_k", [(4, 1), (4, 2), (5, 5)])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_dispatch_matches_dense_loop(n_experts, top_k, renormalize, activation):
    m = make(n_experts=n_experts, top_k=top_k, renormalize=renormalize, activation=activation,
             load_balancing_coef=0.3, z_loss_coef=0.02)
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    y, aux = m(x)
    ref = naive_moe(m, x)
    assert y.dtype == x.dtype and rel_err(y, ref) < 1e-12
    # Gradients, including the router's (through the routing weights and the aux losses).
    w = torch.randn_like(y)
    params = [x, m.router.weight, m.experts.up_proj, m.experts.down_proj]
    got = torch.autograd.grad((y * w).sum() + aux["load_balancing"] + aux["router_z"], params)
    lb_ref, z_ref = hand_aux(m, x)
    assert aux["load_balancing"].item() == pytest.approx(lb_ref, rel=1e-6)
    assert aux["router_z"].item() == pytest.approx(z_ref, rel=1e-6)
    # The reference aux losses in differentiable form: P_e and logsumexp through autograd, f_e constant.
    logits = x.reshape(-1, 16) @ m.router.weight.T
    probs = logits.softmax(-1)
    frac = F.one_hot(probs.topk(top_k).indices, n_experts).sum((0, 1)).double() / (logits.shape[0] * top_k)
    lb = m.load_balancing_coef * n_experts * (frac * probs.mean(0)).sum()
    z = m.z_loss_coef * torch.logsumexp(logits, -1).square().mean()
    expected = torch.autograd.grad((ref * w).sum() + lb + z, params)
    for g, e in zip(got, expected):
        assert rel_err(g, e) < 1e-10


def test_top_k_equals_n_experts_with_renormalize_is_the_dense_softmax_mixture():
    m = make(n_experts=3, top_k=3, renormalize=True)
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    probs = torch.softmax(x @ m.router.weight.T, -1)
    dense = sum(probs[..., e:e + 1] * expert_mlp(m, e, x) for e in range(3))
    assert rel_err(m(x)[0], dense) < 1e-12


def test_aux_losses_in_eval_and_uniform_routing():
    m = make(n_experts=4, top_k=2).eval()
    with torch.no_grad():
        _, aux = m(torch.randn(2, 5, 16, dtype=torch.float64))
    assert set(aux) == {"load_balancing", "router_z"}
    assert all(v.dtype == torch.float32 and v.dim() == 0 and v.item() > 0 for v in aux.values())
    # A zero router gives uniform probabilities: the load-balancing loss is exactly its coefficient
    # (whatever top-k picks), and the z-loss coef * log(E)^2.
    with torch.no_grad():
        m.router.weight.zero_()
        _, aux = m(torch.randn(2, 5, 16, dtype=torch.float64))
    assert aux["load_balancing"].item() == pytest.approx(m.load_balancing_coef, rel=1e-6)
    assert aux["router_z"].item() == pytest.approx(m.z_loss_coef * math.log(4) ** 2, rel=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_drops_overflow_in_token_order(top_k):
    m = make(n_experts=4, top_k=top_k, capacity_factor=0.75, seed=1)
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    y, _ = m(x)
    ref = naive_moe(m, x)
    assert rel_err(y, ref) < 1e-12
    # The case is not vacuous: some assignments were dropped, so the dropless output differs.
    m.capacity_factor = None
    dropless, _ = m(x)
    assert rel_err(dropless, y) > 1e-3
    assert m.capacity(16) is None


def test_capacity_factor_large_is_dropless():
    m = make(n_experts=4, top_k=2, capacity_factor=4.0)  # capacity = all assignments
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    y, _ = m(x)
    m.capacity_factor = None
    assert torch.equal(y, m(x)[0])


def test_padding_excluded_from_routing_and_statistics():
    m = make(n_experts=4, top_k=2, load_balancing_coef=0.5, z_loss_coef=0.1)
    lengths = [6, 3]
    rows = [torch.randn(n, 16, dtype=torch.float64) for n in lengths]
    x = torch.randn(2, 6, 16, dtype=torch.float64) * 10  # junk at the pads
    mask = torch.zeros(2, 6, dtype=torch.bool)
    for b, r in enumerate(rows):
        x[b, 6 - len(r):] = r
        mask[b, 6 - len(r):] = True
    y, aux = m(x, padding_mask=mask)
    assert torch.all(y[~mask] == 0)
    for b, r in enumerate(rows):
        assert rel_err(y[b, mask[b]], m(r[None])[0][0]) < 1e-12
    # The statistics are those of the real tokens alone.
    _, aux_real = m(torch.cat(rows)[None])
    for key in aux:
        assert aux[key].item() == pytest.approx(aux_real[key].item(), rel=1e-6)
    lb, z = hand_aux(m, x, mask)
    assert aux["load_balancing"].item() == pytest.approx(lb, rel=1e-6)
    assert aux["router_z"].item() == pytest.approx(z, rel=1e-6)
    # All pads: zeros, finite aux.
    y0, aux0 = m(x, padding_mask=torch.zeros_like(mask))
    assert torch.all(y0 == 0) and all(v.item() == 0 for v in aux0.values())


def _grouped_mm_works_on_cpu() -> bool:
    mm = grouped_mm_function()
    if mm is None:
        return False
    try:
        mm(torch.randn(4, 16), torch.randn(2, 16, 16), offs=torch.tensor([1, 4], dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _grouped_mm_works_on_cpu(), reason="this torch has no CPU grouped_mm")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_backend_matches_loop(dtype, tol):
    m = make(d_model=32, dtype=dtype, n_experts=5, top_k=2, hidden_size=48)
    x = torch.randn(3, 9, 32, dtype=dtype, requires_grad=True)
    w = torch.randn(3, 9, 32, dtype=dtype)
    results = {}
    for backend in ("loop", "grouped"):
        m.expert_backend = backend
        y, _ = m(x)
        grads = torch.autograd.grad((y.float() * w.float()).sum(), [x, m.experts.gate_proj, m.experts.down_proj])
        results[backend] = (y, *grads)
    for a, b in zip(results["grouped"], results["loop"]):
        assert rel_err(a.float(), b.float()) < tol


def test_jamba_sparse_moe_cross_check():
    pytest.importorskip("transformers")
    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaSparseMoeBlock

    config = JambaConfig(hidden_size=32, intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                         hidden_act="silu")
    torch.manual_seed(0)
    theirs = JambaSparseMoeBlock(config).float()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
    ours = MoE(32, MoEConfig(n_experts=4, top_k=2, hidden_size=48, renormalize=False))
    gate, up = theirs.experts.gate_up_proj.detach().chunk(2, dim=1)  # [E, 2I, H]: gate rows then up rows
    ours.load_state_dict({
        "router.weight": theirs.router.weight.detach(),
        "experts.gate_proj": gate, "experts.up_proj": up,
        "experts.down_proj": theirs.experts.down_proj.detach(),
    })
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        expected = theirs(x)
        expected = expected[0] if isinstance(expected, tuple) else expected
        got, _ = ours(x)
    assert rel_err(got, expected) <= 1e-4


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="top_k"):
        MoE(16, MoEConfig(n_experts=2, top_k=3))
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(16, MoEConfig(n_experts=2, top_k=1, capacity_factor=0.0))
    with pytest.raises(ValueError, match="activation"):
        MoE(16, MoEConfig(n_experts=2, top_k=1, activation="relu"))
    m = make(n_experts=2, top_k=1)
    m.expert_backend = "triton"
    with pytest.raises(ValueError, match="expert backend"):
        m(torch.randn(1, 3, 16, dtype=torch.float64))


def test_router_stays_float32_under_autocast():
    m = make(n_experts=4, top_k=2, dtype=torch.float32)
    x = torch.randn(2, 5, 16)
    _, aux = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux_autocast = m(x)
    assert y.dtype == torch.float32
    for key in aux:
        assert torch.equal(aux[key], aux_autocast[key])


@pytest.mark.parametrize("mode", ["dense", "gather"])
@pytest.mark.parametrize("top_k,renormalize,activation,capacity_factor", [
    (1, False, "swiglu", None), (2, True, "swiglu", None), (2, False, "gelu", 0.6), (3, True, "swiglu", 0.9),
])
def test_fixed_shape_decoding_route_equals_dispatch(mode, top_k, renormalize, activation, capacity_factor):
    """One position per row (a decoding step) routes with fixed shapes; it equals the dispatch path on
    the same tokens (given as one row of length B), drops and auxiliary losses included."""
    m = make(n_experts=5, top_k=top_k, renormalize=renormalize, activation=activation,
             capacity_factor=capacity_factor, load_balancing_coef=0.3, z_loss_coef=0.2, seed=2)
    m.decode_experts = mode
    x = torch.randn(7, 1, 16, dtype=torch.float64)
    y, aux = m(x)
    ref, ref_aux = m(x.transpose(0, 1))  # [1, 7, d]: the dispatch path, same 7 tokens, same capacity
    assert rel_err(y[:, 0], ref[0]) < 1e-12
    for name in aux:
        assert aux[name].item() == pytest.approx(ref_aux[name].item(), rel=1e-12)
    if capacity_factor is not None:  # not vacuous: the cap dropped assignments
        m.capacity_factor = None
        assert rel_err(m(x)[0], y) > 1e-3
    # Differentiable like the dispatch path.
    xg = x.clone().requires_grad_(True)
    m.capacity_factor = capacity_factor
    (g,) = torch.autograd.grad(m(xg)[0].sum(), xg)
    xr = x.transpose(0, 1).clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(m(xr)[0].sum(), xr)
    assert rel_err(g[:, 0], gr[0]) < 1e-12


def test_fixed_shape_route_auto_choice_and_bad_mode():
    m = make(n_experts=8, top_k=2)
    x = torch.randn(1, 1, 16, dtype=torch.float64)
    y_auto = m(x)[0]  # 3 * 1 * 2 < 8: gathers the chosen experts
    m.decode_experts = "dense"
    assert rel_err(y_auto, m(x)[0]) < 1e-12
    m.decode_experts = "sparse"
    with pytest.raises(ValueError, match="decode_experts"):
        m(x)
