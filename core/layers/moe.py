"""Mixture of experts replacing an MLP: softmax router, top-k routing, dropless grouped dispatch.

    probs = softmax(router(x))                    float32, over the n_experts experts
    weights, experts = top_k(probs)               optionally renormalized to sum to 1 (Mixtral)
    y = sum_{slots} weights * expert_mlp(x)       each expert a SwiGLU or GELU MLP (core.layers.mlp)

Dispatch. Tokens are flattened to [T, d_model]; the T * top_k (token, slot) assignments are sorted by
expert (stably, so token order is kept inside an expert) and each expert runs once over its contiguous
segment: through ``grouped_mm`` (one grouped GEMM for all experts) on CUDA where the running torch
supports it for the dtype and shapes, else a loop over the non-empty experts. The weighted results are
scatter-added back to their tokens in float32. Nothing is padded and, by default, nothing is dropped.

Decoding. An input with one position per row (L == 1, no padding mask: a decoding step) is routed with
fixed shapes instead, so that the step is capturable in a CUDA graph (no sort, no data-dependent
segment sizes, no host sync): each (token, slot) assignment gets its expert's output either from every
expert run densely on all T tokens (``[E, T, d_model]``) or, when ``3 T top_k < n_experts`` (few tokens,
many experts: reading all experts would cost more than copying the chosen ones), from the chosen
experts' weights gathered per assignment. Capacity ranks come from a cumulative count per expert in
token order. The result equals the dispatch path's (the same experts, weights, drops and auxiliary
losses, up to the order of float32 additions); ``decode_experts`` forces ``dense`` or ``gather``.

Capacity. ``capacity_factor=None`` is dropless. A number caps every expert at
``ceil(capacity_factor * T * top_k / n_experts)`` assignments (T counts real tokens); assignments past
the cap are dropped in token order (the earliest tokens keep their place, as in Switch / GShard without
priority routing). A dropped assignment contributes nothing; the kept weights are not renormalized, so
a token dropped by all its experts gets 0 here and passes through the block's residual unchanged.

Auxiliary losses, returned already multiplied by their coefficients (from ``MoEConfig``), in float32,
in training and eval alike:
- ``load_balancing`` = coef * n_experts * sum_e f_e * P_e (Switch Transformer; Megatron-LM's form for
  top-k), where f_e is the fraction of the T * top_k routed assignments that chose expert e (before any
  capacity drop; not differentiable) and P_e the mean router probability of expert e. It is 1 * coef
  for perfectly uniform routing.
- ``router_z`` = coef * mean_t logsumexp(logits_t)^2 (ST-MoE's router z-loss).
Padding positions (``padding_mask`` False) are not routed at all: they get y = 0, take no capacity and
are left out of both statistics.

Parameters: ``router`` (Linear d_model -> n_experts, no bias) and ``experts.gate_proj`` [E, hidden,
d_model], ``experts.up_proj`` [E, hidden, d_model], ``experts.down_proj`` [E, d_model, hidden] (GELU
experts have no gate_proj): each expert's matrices in nn.Linear's [out, in] layout, stacked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.config import MoEConfig
from core.layers.mlp import mlp_hidden_size

EXPERT_BACKENDS = ("auto", "loop", "grouped")
DECODE_EXPERTS = ("auto", "dense", "gather")


def grouped_mm_function():
    """torch's grouped GEMM (``F.grouped_mm`` in torch >= 2.10, ``torch._grouped_mm`` before), or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(x: torch.Tensor, d_model: int, hidden: int) -> bool:
    """Whether the grouped GEMM can run the experts for x on its device (the ``auto`` choice).

    Only CUDA qualifies (on CPU the loop over experts is as fast and supports every dtype). The kernels
    take bfloat16 on every torch version that has them, with row strides aligned to 16 bytes, on SM80+
    (``torch._grouped_mm`` before torch 2.9: SM90 only).
    """
    if grouped_mm_function() is None or x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    if (d_model * x.element_size()) % 16 != 0 or (hidden * x.element_size()) % 16 != 0:
        return False
    capability = torch.cuda.get_device_capability(x.device)
    if hasattr(F, "grouped_mm"):
        return capability >= (8, 0)
    version = tuple(int(part) for part in torch.__version__.split(".")[:2])
    return capability >= (8, 0) if version >= (2, 9) else capability[0] == 9


class Experts(nn.Module):
    """``n_experts`` MLPs with stacked weights, run over tokens already grouped by expert."""

    def __init__(
        self, n_experts: int, d_model: int, hidden_size: int, activation: str,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.n_experts = n_experts
        self.d_model = d_model
        self.hidden_size = hidden_size
        self.activation = activation
        if activation == "swiglu":
            self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden_size, d_model, **factory))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden_size, d_model, **factory))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, hidden_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert as a fresh nn.Linear: uniform(+-1/sqrt(fan_in))."""
        for name in ("gate_proj", "up_proj", "down_proj"):
            weight = getattr(self, name, None)
            if weight is not None:
                bound = 1.0 / math.sqrt(weight.shape[-1])
                nn.init.uniform_(weight, -bound, bound)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """x [N, d_model], rows grouped by expert with ``counts`` [E] (int64) rows each -> [N, d_model].

        backend: ``loop`` (a matmul per non-empty expert), ``grouped`` (torch's grouped GEMM) or
        ``auto`` (grouped where :func:`grouped_mm_supported`, else loop).
        """
        if backend not in EXPERT_BACKENDS:
            raise ValueError(f"unknown expert backend {backend!r}; choose one of {EXPERT_BACKENDS}")
        if x.shape[0] == 0:
            return x.new_zeros(0, self.d_model)
        if backend == "auto":
            backend = "grouped" if grouped_mm_supported(x, self.d_model, self.hidden_size) else "loop"
        if backend == "grouped":
            return self._grouped(x, counts)
        return self._loop(x, counts)

    def _activate(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for SwiGLU, gelu(up) for GELU (exact GELU, as core.layers.mlp)."""
        if self.activation == "swiglu":
            return F.silu(gate) * up
        return F.gelu(up)

    def _loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        outputs = []
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            rows = x[start:start + count]
            start += count
            gate = F.linear(rows, self.gate_proj[expert]) if self.activation == "swiglu" else None
            hidden = self._activate(gate, F.linear(rows, self.up_proj[expert]))
            outputs.append(F.linear(hidden, self.down_proj[expert]))
        return torch.cat(outputs, dim=0)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every row: x [T, d_model] -> [E, T, d_model] (fixed shapes, no routing)."""
        xe = x.unsqueeze(0).expand(self.n_experts, *x.shape)
        gate = torch.bmm(xe, self.gate_proj.transpose(1, 2)) if self.activation == "swiglu" else None
        hidden = self._activate(gate, torch.bmm(xe, self.up_proj.transpose(1, 2)))
        return torch.bmm(hidden, self.down_proj.transpose(1, 2))

    def gathered(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Row t through expert ``experts[t, j]`` for every slot j: x [T, d_model], experts int64 [T, k]
        -> [T, k, d_model]. Copies the T * k chosen weight matrices (fixed shapes, no routing)."""
        tokens, slots = experts.shape
        index = experts.reshape(-1)
        rows = x.unsqueeze(1).expand(tokens, slots, x.shape[-1]).reshape(tokens * slots, 1, x.shape[-1])

        def through(weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
            return torch.bmm(inputs, weight.index_select(0, index).transpose(1, 2))

        gate = through(self.gate_proj, rows) if self.activation == "swiglu" else None
        hidden = self._activate(gate, through(self.up_proj, rows))
        return through(self.down_proj, hidden).view(tokens, slots, x.shape[-1])

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        mm = grouped_mm_function()
        if mm is None:
            raise RuntimeError("the grouped expert backend needs torch.nn.functional.grouped_mm or "
                               "torch._grouped_mm (torch >= 2.8); use backend='loop'")
        offsets = counts.cumsum(0).to(torch.int32)  # end of each expert's segment
        # The weights are stored [E, out, in]; the kernel wants [E, in, out]: a transposed view.
        gate = mm(x, self.gate_proj.transpose(-2, -1), offs=offsets) if self.activation == "swiglu" else None
        hidden = self._activate(gate, mm(x, self.up_proj.transpose(-2, -1), offs=offsets))
        return mm(hidden, self.down_proj.transpose(-2, -1), offs=offsets)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, d_model={self.d_model}, hidden_size={self.hidden_size}, "
                f"activation={self.activation}")


class MoE(nn.Module):
    """Top-k mixture of MLP experts (see the module docstring).

    forward: x [B, L, d_model] (any float dtype) -> (y [B, L, d_model] in x's dtype,
    {"load_balancing": float32 scalar, "router_z": float32 scalar}). Stateless across tokens: no cache.
    ``expert_backend`` (attribute, default ``auto``) forces ``loop`` or ``grouped`` expert compute;
    ``decode_experts`` (default ``auto``) forces ``dense`` or ``gather`` for one-position inputs.
    """

    # One-position inputs are routed with fixed shapes: capturable in a CUDA graph (core.cuda_graph).
    cuda_graph_safe = True

    def __init__(
        self,
        d_model: int,
        config: MoEConfig,
        layer_idx: int = 0,
        norm_eps: float = 1e-5,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if config.n_experts < 1:
            raise ValueError(f"moe.n_experts must be >= 1, got {config.n_experts}")
        if not 1 <= config.top_k <= config.n_experts:
            raise ValueError(
                f"moe.top_k={config.top_k} must be between 1 and n_experts={config.n_experts}"
            )
        if config.capacity_factor is not None and config.capacity_factor <= 0:
            raise ValueError(
                f"moe.capacity_factor must be > 0, or None for dropless routing; got {config.capacity_factor}"
            )
        self.d_model = d_model
        self.layer_idx = layer_idx
        self.n_experts = config.n_experts
        self.top_k = config.top_k
        self.renormalize = config.renormalize
        self.capacity_factor = config.capacity_factor
        self.load_balancing_coef = config.load_balancing_coef
        self.z_loss_coef = config.z_loss_coef
        self.expert_backend = "auto"
        self.decode_experts = "auto"
        hidden = mlp_hidden_size(d_model, config)
        self.router = nn.Linear(d_model, config.n_experts, bias=False, device=device, dtype=dtype)
        self.experts = Experts(config.n_experts, d_model, hidden, config.activation, device, dtype)

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        return None

    def capacity(self, n_tokens: int) -> int | None:
        """Assignments each expert takes for ``n_tokens`` routed tokens; None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def forward(
        self, x: torch.Tensor, cache: None = None, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MoE expects x [B, L, {self.d_model}], got {tuple(x.shape)}")
        batch, seqlen, d_model = x.shape
        if padding_mask is not None and (padding_mask.dtype != torch.bool or padding_mask.shape != (batch, seqlen)):
            raise ValueError(
                f"padding_mask must be bool [B, L] = [{batch}, {seqlen}] (True = real token), got "
                f"{padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        if seqlen == 1 and padding_mask is None:
            return self._forward_fixed(x)
        tokens = x.reshape(-1, d_model)
        # Routed tokens: all, or the real ones (pads take no expert, no capacity, no statistics).
        token_ids = None if padding_mask is None else padding_mask.reshape(-1).nonzero().squeeze(1)
        routed = tokens if token_ids is None else tokens[token_ids]

        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        logits, probs, weights, chosen = self._route(routed)
        aux = self._aux_losses(logits, probs, chosen)

        # (token, slot) assignments, token-major, then grouped by expert keeping token order.
        n_routed = routed.shape[0]
        expert_of = chosen.reshape(-1)
        order = torch.argsort(expert_of, stable=True)
        expert_sorted = expert_of[order]
        row_sorted = order // self.top_k  # index into `routed`
        weight_sorted = weights.reshape(-1)[order]
        counts = torch.bincount(expert_of, minlength=self.n_experts)
        capacity = self.capacity(n_routed)
        if capacity is not None:
            segment_start = counts.cumsum(0) - counts
            rank = torch.arange(order.numel(), device=x.device) - segment_start[expert_sorted]
            keep = rank < capacity
            row_sorted, weight_sorted = row_sorted[keep], weight_sorted[keep]
            counts = counts.clamp(max=capacity)

        out_sorted = self.experts(routed[row_sorted], counts, self.expert_backend)  # [N, d_model]
        combined = out_sorted.to(compute) * weight_sorted[:, None]
        y_routed = torch.zeros(n_routed, d_model, device=x.device, dtype=compute)
        y_routed = y_routed.index_add(0, row_sorted, combined)
        if token_ids is None:
            y = y_routed
        else:
            y = torch.zeros(tokens.shape[0], d_model, device=x.device, dtype=compute)
            y = y.index_copy(0, token_ids, y_routed)
        return y.to(x.dtype).view(batch, seqlen, d_model), aux

    def _route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router over tokens [T, d_model]: (logits [T, E], probs [T, E], weights [T, k], chosen [T, k]).

        The router runs in float32 (float64 for float64 inputs), also under autocast: bf16 logits flip
        near-tied top-k picks.
        """
        compute = torch.float64 if tokens.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            logits = F.linear(tokens.to(compute), self.router.weight.to(compute))  # [T, E]
        probs = logits.softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights, chosen

    def _forward_fixed(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One position per row (decoding), with shapes that do not depend on the routing."""
        batch, seqlen, d_model = x.shape
        tokens = x.reshape(-1, d_model)
        n_tokens = tokens.shape[0]
        logits, probs, weights, chosen = self._route(tokens)
        aux = self._aux_losses(logits, probs, chosen)
        capacity = self.capacity(n_tokens)
        if capacity is not None:
            # Rank of each (token, slot) assignment among its expert's, in token order (the dispatch
            # path's stable sort); past the capacity it is dropped (weight 0, not renormalized).
            flat = chosen.reshape(-1, 1)
            onehot = torch.zeros(flat.shape[0], self.n_experts, device=x.device, dtype=torch.long)
            onehot.scatter_(1, flat, 1)
            rank = (onehot.cumsum(dim=0) - onehot).gather(1, flat).view_as(chosen)
            weights = weights * (rank < capacity)
        mode = self.decode_experts
        if mode not in DECODE_EXPERTS:
            raise ValueError(f"unknown decode_experts {mode!r}; choose one of {DECODE_EXPERTS}")
        if mode == "auto":
            mode = "gather" if 3 * n_tokens * self.top_k < self.n_experts else "dense"
        if mode == "dense":
            every = self.experts.dense(tokens)  # [E, T, d_model]
            outputs = every[chosen, torch.arange(n_tokens, device=x.device)[:, None]]  # [T, k, d_model]
        else:
            outputs = self.experts.gathered(tokens, chosen)
        y = (outputs.to(weights.dtype) * weights[..., None]).sum(dim=1)
        return y.to(x.dtype).view(batch, seqlen, d_model), aux

    def _aux_losses(
        self, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Load-balancing and z losses (scaled by their coefficients) over the routed tokens, float32."""
        n_routed = logits.shape[0]
        if n_routed == 0:
            zero = logits.new_zeros((), dtype=torch.float32)
            return {"load_balancing": zero, "router_z": zero.clone()}
        # Counted with a scatter rather than bincount, whose output size depends on the data (a host
        # sync, which a CUDA graph cannot capture).
        flat = chosen.reshape(-1)
        counts = torch.zeros(self.n_experts, device=flat.device, dtype=probs.dtype)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=probs.dtype))
        fraction = counts / (n_routed * self.top_k)  # f_e, sums to 1
        mean_prob = probs.mean(dim=0)  # P_e
        load_balancing = self.load_balancing_coef * self.n_experts * (fraction * mean_prob).sum()
        router_z = self.z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean()
        return {"load_balancing": load_balancing.float(), "router_z": router_z.float()}

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_experts={self.n_experts}, top_k={self.top_k}, "
                f"renormalize={self.renormalize}, capacity_factor={self.capacity_factor}")
