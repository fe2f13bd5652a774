"""The pattern grammar: one character per block, and the allocators that write patterns.

A model is a stack of pre-norm residual blocks ``x + mixer(norm(x))``. Its ``ModelConfig.pattern``
names each block's mixer with one character:

=====  ===========================  =============================================
char   block                        from
=====  ===========================  =============================================
``M``  Mamba-2 (SSD)                Megatron-LM hybrid (``Symbols.MAMBA``)
``*``  attention                    Megatron-LM hybrid (``Symbols.ATTENTION``)
``-``  MLP                          Megatron-LM hybrid (``Symbols.MLP``)
``E``  mixture of experts           Megatron-LM hybrid (``Symbols.MOE``)
``S``  Mamba-1 (S6)                 ours
``H``  Hyena                        ours
``L``  S4D (LTI, SaShiMi baseline)  ours
=====  ===========================  =============================================

So a Transformer++ layer (attention then MLP) is two characters ``*-``, a Mamba-1 LM of 24 layers is
``"S" * 24``, and NVIDIA's Mamba-2-Hybrid 8B is the 56-character string that :func:`allocate_layers`
writes for ``(56, 0.08, 0.5)``.

Two allocators write patterns from a few numbers:

- :func:`allocate_layers` is Megatron-LM's rule (``megatron/core/ssm/mamba_hybrid_layer_allocation.py``):
  attention layers spread evenly among the Mamba layers, then MLP layers spread evenly over the Mamba
  layers that remain, right-justified.
- :func:`jamba_pattern` is Jamba's layout (HF ``JambaConfig``): every Jamba layer is a sequence mixer
  followed by an FFN; the mixer is attention at ``attn_layer_offset`` of each ``attn_layer_period``
  layers (Mamba-1 elsewhere), the FFN a MoE at ``expert_layer_offset`` of each ``expert_layer_period``
  layers (an MLP elsewhere). The pattern has two characters per Jamba layer.
"""

from __future__ import annotations

from collections import Counter

MAMBA2 = "M"
ATTENTION = "*"
MLP = "-"
MOE = "E"
MAMBA1 = "S"
HYENA = "H"
S4D = "L"  # linear time-invariant SSM: fixed dynamics, FFT convolution in training

# char -> (block, origin); the order is the table's.
LAYER_TYPES: dict[str, tuple[str, str]] = {
    MAMBA2: ("Mamba-2 (SSD)", "Megatron-LM"),
    ATTENTION: ("attention", "Megatron-LM"),
    MLP: ("MLP", "Megatron-LM"),
    MOE: ("mixture of experts", "Megatron-LM"),
    MAMBA1: ("Mamba-1 (S6)", "ours"),
    HYENA: ("Hyena", "ours"),
    S4D: ("S4D (LTI SSM)", "ours"),
}

# Blocks that carry state from token to token (their mixers allocate an inference cache).
SEQUENCE_MIXERS = frozenset({MAMBA2, ATTENTION, MAMBA1, HYENA, S4D})
# Blocks that act on each position alone.
CHANNEL_MIXERS = frozenset({MLP, MOE})


def pattern_table() -> str:
    """The grammar as a one-line-per-character table, for error messages and ``--help`` texts."""
    return "\n".join(f"  {char!r}: {name} ({origin})" for char, (name, origin) in LAYER_TYPES.items())


def validate_pattern(pattern: str) -> str:
    """Check that ``pattern`` is a non-empty string of known characters; return it unchanged.

    Errors name the first bad character, its position and the table of valid characters.
    """
    if not isinstance(pattern, str):
        raise TypeError(
            f"pattern must be a string with one character per block, got {type(pattern).__name__} "
            f"{pattern!r}; valid characters:\n{pattern_table()}"
        )
    if not pattern:
        raise ValueError(
            "pattern is empty: a model needs at least one block; write one character per block, e.g. "
            f"'S' * 24 for a Mamba-1 LM or '*-' * 12 for a Transformer++; valid characters:\n{pattern_table()}"
        )
    for position, char in enumerate(pattern):
        if char not in LAYER_TYPES:
            shown = f"pattern {pattern!r}"
            if repr(pattern) == f"'{pattern}'":  # no escapes: a caret can point at the character
                shown += "\n" + " " * (len("pattern '") + position) + "^"
            raise ValueError(
                f"pattern has an unknown block character {char!r} at position {position}:\n"
                f"{shown}\nvalid characters:\n{pattern_table()}"
            )
    return pattern


def count_layers(pattern: str) -> dict[str, int]:
    """How many blocks of each character ``pattern`` has (every character of the table, zeros included)."""
    validate_pattern(pattern)
    counts = Counter(pattern)
    return {char: counts.get(char, 0) for char in LAYER_TYPES}


def allocate_layers(n_layers: int, attention_ratio: float, mlp_ratio: float) -> str:
    """Megatron-LM's hybrid allocation: ``n_layers`` blocks of Mamba-2, attention and MLP.

    ``round(n_layers * attention_ratio)`` attention blocks are spread evenly so that the Mamba-2 runs
    between them (and before the first and after the last) have near-equal length; then
    ``round(n_layers * mlp_ratio)`` of the remaining Mamba-2 blocks become MLP blocks, spread evenly
    and right-justified. Both spreads use the same running-distance rule: walk the layers keeping ``x``,
    the distance left to the next placement; place when ``x < 0.5`` (then ``x += spacing``), else
    ``x -= 1``.

    ``allocate_layers(56, 0.08, 0.5)`` is NVIDIA's Mamba-2-Hybrid 8B:
    ``M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-`` (24 M, 4 *, 28 -).
    """
    if not isinstance(n_layers, int) or n_layers <= 0:
        raise ValueError(f"allocate_layers: n_layers must be a positive int, got {n_layers!r}")
    for name, ratio in (("attention_ratio", attention_ratio), ("mlp_ratio", mlp_ratio)):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"allocate_layers: {name} must be in [0, 1], got {ratio}")
    if attention_ratio + mlp_ratio > 1.0:
        raise ValueError(
            f"allocate_layers: attention_ratio + mlp_ratio = {attention_ratio + mlp_ratio} exceeds 1; "
            "the Mamba-2 share is 1 - attention_ratio - mlp_ratio and cannot be negative"
        )
    n_attention = round(n_layers * attention_ratio)
    n_mlp = round(n_layers * mlp_ratio)
    if n_attention + n_mlp > n_layers:
        # Rounding both counts up can overshoot (7 layers at 0.5 / 0.5 would need 4 + 4).
        raise ValueError(
            f"allocate_layers: round({n_layers} * {attention_ratio}) = {n_attention} attention plus "
            f"round({n_layers} * {mlp_ratio}) = {n_mlp} MLP blocks exceed {n_layers} layers; lower a ratio"
        )
    layers = [MAMBA2] * n_layers

    # Attention: n_attention + 1 Mamba sections of equal (fractional) length around the attention blocks.
    n_mamba = n_layers - n_attention
    section = n_mamba / (n_attention + 1)
    distance = section
    for i in range(n_layers):
        if distance < 0.5:
            layers[i] = ATTENTION
            distance += section
        else:
            distance -= 1

    # MLP: among the blocks still Mamba-2 only, one MLP every (remaining Mamba / MLP) of them.
    if n_mlp > 0:
        spacing = (n_mamba - n_mlp) / n_mlp
        distance = spacing
        for i in range(n_layers):
            if layers[i] != MAMBA2:
                continue
            if distance < 0.5:
                layers[i] = MLP
                distance += spacing
            else:
                distance -= 1
    return "".join(layers)


def jamba_pattern(
    n_layers: int,
    attn_layer_period: int = 8,
    attn_layer_offset: int = 4,
    expert_layer_period: int = 2,
    expert_layer_offset: int = 1,
    mamba: str = MAMBA1,
) -> str:
    """Jamba's layout over ``n_layers`` Jamba layers, as HF ``JambaConfig``; 2 characters per layer.

    Jamba layer ``i`` is a mixer block then an FFN block: the mixer is attention when
    ``i % attn_layer_period == attn_layer_offset``, else ``mamba`` (Mamba-1 by default); the FFN is a
    MoE when ``i % expert_layer_period == expert_layer_offset``, else an MLP. Jamba-v0.1's defaults
    (8, 4, 2, 1) give a 1:7 attention-to-Mamba ratio and a MoE every other layer.

    >>> jamba_pattern(8)
    'S-SES-SE*-SES-SE'
    """
    if not isinstance(n_layers, int) or n_layers <= 0:
        raise ValueError(f"jamba_pattern: n_layers must be a positive int, got {n_layers!r}")
    for kind, period, offset in (
        ("attn", attn_layer_period, attn_layer_offset),
        ("expert", expert_layer_period, expert_layer_offset),
    ):
        if period <= 0:
            raise ValueError(f"jamba_pattern: {kind}_layer_period must be positive, got {period}")
        if not 0 <= offset < period:
            raise ValueError(
                f"jamba_pattern: {kind}_layer_offset ({offset}) must be in [0, {kind}_layer_period = {period})"
            )
    if mamba not in (MAMBA1, MAMBA2):
        raise ValueError(f"jamba_pattern: mamba must be {MAMBA1!r} (Mamba-1) or {MAMBA2!r} (Mamba-2), got {mamba!r}")
    blocks = []
    for i in range(n_layers):
        blocks.append(ATTENTION if i % attn_layer_period == attn_layer_offset else mamba)
        blocks.append(MOE if i % expert_layer_period == expert_layer_offset else MLP)
    return "".join(blocks)
