"""Multi-device training: activation checkpointing, per-block torch.compile, FSDP wrapping and mixed
precision, the strategy.

The model code knows nothing of parallelism (torchtitan's split): the pieces here are applied to a
built model from outside, and :func:`build_strategy` turns the ``trainer`` config into the Lightning
strategy that :func:`core.training.build_trainer` hands to the Trainer.

    trainer.strategy: auto | ddp | fsdp
    trainer.activation_checkpointing: false | true | full | none | <n> | every_<n>
    trainer.compile: false | true, trainer.compile_backend: inductor (any torch.compile backend)
    trainer.devices, trainer.num_nodes
    trainer.fsdp: {sharding_strategy, state_dict_type, cpu_offload}   (optional, fsdp only)

Activation checkpointing (:func:`apply_activation_checkpointing`) wraps each residual block
(:class:`core.backbone.Block`, wherever it sits: a CausalLM's backbone, every level of a
:class:`core.multiscale.MultiScaleLM`, both backbones of :mod:`core.bidirectional`) in torch's
non-reentrant checkpoint wrapper: the block's activations are dropped after its forward and recomputed
in the backward, so a step keeps only the residual stream between blocks. Results are unchanged (the
recompute runs the same ops on the same inputs with the same RNG state).

FSDP (``strategy=fsdp``, Lightning's FSDPStrategy over torch's FullyShardedDataParallel, FSDP1):

- one FSDP unit per block (:func:`fsdp_wrap_policy`; a checkpoint-wrapped block is wrapped outside its
  checkpoint wrapper, torch's recommended ``FSDP(checkpoint(block))`` order); the embedding, the final
  norm and the LM head stay in the root unit (tied embeddings must share one unit);
- mixed precision (:func:`fsdp_mixed_precision`): under ``bf16-mixed`` parameters are all-gathered and
  used in bf16, gradients are reduced in fp32, and the mixers whose parameters set decay rates (Mamba-1,
  Mamba-2, S4D; Hyena's implicit filter) are their own FSDP units kept in fp32, so ``A_log``, ``D``
  and the dt bias are never rounded to bf16 (their matmuls still run in bf16 under autocast). Finer
  than per module is not possible with FSDP1: a unit's parameters are flattened into one tensor of one
  dtype, and the SSM parameters share their module with the projections;
- sharded checkpoints (``state_dict_type=sharded``): every rank writes its shard through
  torch.distributed.checkpoint, which reshards on load, so a run resumes on another device count
  (at equal global batch the data stream continues exactly: see ``ResumableSampler``).
  ``python -m core.checkpoint consolidate <ckpt> <export>`` turns one into an export.

FSDP2 (``fully_shard``, Lightning's ModelParallelStrategy) is not offered: Lightning requires every
LightningModule to shard itself in ``configure_model``, which the domains' modules do not, and FSDP1
already gives per-block units, fp32 SSM mixers and resharding checkpoints. MoE experts are sharded like
any other weight (no expert parallelism).
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from torch import nn

from core.backbone import Block

STRATEGIES = ("auto", "ddp", "fsdp")
ACTIVATION_CHECKPOINTING_MODES = ("none", "full", "every_n")
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")
FSDP_STATE_DICT = ("sharded", "full")
# The attribute under which a parameter's shape before FSDP flattening is kept (core.training's weight
# decay groups need its number of dimensions; FSDP1 keeps the Parameter objects and their attributes).
SHAPE_ATTR = "_ssm_suite_shape"
# Wrapper prefixes that can appear in parameter names (FSDP1 units, checkpoint wrappers).
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


# --------------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------------

def parse_activation_checkpointing(value: Any) -> tuple[str, int]:
    """The ``trainer.activation_checkpointing`` value as ``(mode, every_n)``.

    false / None / "none" -> ("none", 1); true / "full" -> ("full", 1); an int n >= 1 or "every_<n>"
    -> ("every_n", n) (n = 1 is "full").
    """
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("none", "false", "off")):
        return "none", 1
    if value is True or (isinstance(value, str) and value.lower() in ("full", "true", "on")):
        return "full", 1
    n: Any = value
    if isinstance(value, str) and value.lower().startswith("every_"):
        n = value[len("every_"):]
    try:
        n = int(n)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(value, float):
        raise ValueError(
            f"trainer.activation_checkpointing={value!r} is not valid; use false (none), true (full: every "
            "block), an int n >= 1 or 'every_<n>' (every n-th block)"
        )
    return ("full", 1) if n == 1 else ("every_n", n)


def _checkpoint_wrapper_cls() -> type:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    return CheckpointWrapper


def _is_checkpointed_block(module: nn.Module) -> bool:
    return isinstance(module, _checkpoint_wrapper_cls()) and isinstance(module._checkpoint_wrapped_module, Block)


def checkpointed_blocks(model: nn.Module) -> int:
    """How many blocks of ``model`` are wrapped for activation checkpointing."""
    return sum(1 for m in model.modules() if _is_checkpointed_block(m))


def apply_activation_checkpointing(model: nn.Module, mode: str = "full", every_n: int = 2) -> int:
    """Wrap ``model``'s residual blocks in torch's non-reentrant checkpoint wrapper, in place.

    mode:    "full" (every block), "every_n" (blocks 0, n, 2n, ... in the order ``model.modules()``
             meets them), "none" (nothing).
    Returns the number of blocks wrapped. ``state_dict`` keys and attribute access (``block.mixer``)
    are unchanged, so exports and generation see the same model; ``named_parameters`` gain a
    ``_checkpoint_wrapped_module.`` segment (:func:`clean_parameter_name` drops it). Raises if
    ``model`` has no block or is already checkpointed.
    """
    if mode not in ACTIVATION_CHECKPOINTING_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {list(ACTIVATION_CHECKPOINTING_MODES)}")
    if mode == "none":
        return 0
    if mode == "every_n" and (not isinstance(every_n, int) or every_n < 1):
        raise ValueError(f"every_n must be an int >= 1, got {every_n!r}")
    if checkpointed_blocks(model):
        raise ValueError("apply_activation_checkpointing: the model is already checkpointed (apply it once)")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    step = 1 if mode == "full" else every_n
    # Collect (parent, child name) first: replacing children while walking the tree would revisit them.
    sites = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, Block)]
    if not sites:
        raise ValueError(f"apply_activation_checkpointing: {type(model).__name__} contains no core.backbone.Block")
    wrapped = 0
    for index, (parent, name) in enumerate(sites):
        if index % step:
            continue
        block = getattr(parent, name)
        # Non-reentrant: supports keyword arguments and outputs that are not tensors (the block returns
        # (x, aux dict)), and works with DDP / FSDP hooks; the RNG state is restored for the recompute.
        setattr(parent, name, checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
        wrapped += 1
    return wrapped


# --------------------------------------------------------------------------------------------------
# FSDP: wrap policy, mixed precision, parameter bookkeeping
# --------------------------------------------------------------------------------------------------

def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units: each block, or its checkpoint wrapper when it has one."""
    inner = {id(m._checkpoint_wrapped_module) for m in model.modules() if _is_checkpointed_block(m)}
    return [m for m in model.modules()
            if _is_checkpointed_block(m) or (isinstance(m, Block) and id(m) not in inner)]


def fsdp_wrap_policy(model: nn.Module) -> Any:
    """FSDP1's auto-wrap policy for ``model`` as it is now (apply activation checkpointing first):
    one unit per block (see :func:`fsdp_units`); everything else (embedding, final norm, head) is in
    the root unit."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    units = {id(m) for m in fsdp_units(model)}
    if not units:
        raise ValueError(f"fsdp_wrap_policy: {type(model).__name__} contains no core.backbone.Block to shard by")
    return CustomPolicy(lambda module: id(module) in units)


def fp32_mixer_classes() -> tuple[type[nn.Module], ...]:
    """Modules whose parameters stay float32 under FSDP mixed precision: those holding the parameters
    that set decay rates or long filters (A_log, D, dt bias, S4D's modes, Hyena's implicit filter),
    which the mixers create in float32 on purpose (see docs/architecture.md)."""
    from core.layers.hyena import HyenaFilter
    from core.layers.mamba1 import Mamba1
    from core.layers.mamba2 import Mamba2
    from core.layers.s4d import S4D

    return (Mamba1, Mamba2, S4D, HyenaFilter)


def fsdp_mixed_precision(precision: str) -> Any:
    """torch's FSDP ``MixedPrecision`` for a Lightning precision flag, or None (full precision).

    ``bf16-mixed`` / ``16-mixed``: parameters cast to the low dtype for compute except the
    :func:`fp32_mixer_classes` (their own units, float32), gradients reduced in float32, buffers float32;
    Lightning's FSDP precision plugin adds autocast, so matmuls run in the low dtype everywhere.
    ``bf16-true`` / ``16-true``: the whole model is in the low dtype (Lightning converts it), gradients
    are still reduced in float32. ``32-true``: None.
    """
    from torch.distributed.fsdp import MixedPrecision

    precision = str(precision)
    low = {"bf16": torch.bfloat16, "16": torch.float16}
    kind, _, mode = precision.partition("-")
    if precision in ("32-true", "32", "64-true", "64"):
        return None
    if kind not in low or mode not in ("mixed", "true"):
        raise ValueError(f"FSDP: unsupported precision {precision!r}; use 32-true, bf16-mixed, bf16-true, 16-mixed "
                         "or 16-true")
    if mode == "true":
        return MixedPrecision(param_dtype=low[kind], reduce_dtype=torch.float32, buffer_dtype=low[kind])
    return MixedPrecision(param_dtype=low[kind], reduce_dtype=torch.float32, buffer_dtype=torch.float32,
                          _module_classes_to_ignore=fp32_mixer_classes())


def record_parameter_shapes(model: nn.Module) -> None:
    """Remember each parameter's shape on the parameter (``SHAPE_ATTR``) before FSDP flattens it into
    1-D shards, for :func:`original_ndim`."""
    for param in model.parameters():
        if not hasattr(param, SHAPE_ATTR):
            setattr(param, SHAPE_ATTR, tuple(param.shape))


def original_ndim(param: torch.Tensor) -> int:
    """A parameter's number of dimensions before FSDP sharding (its current one when unrecorded)."""
    shape = getattr(param, SHAPE_ATTR, None)
    return param.dim() if shape is None else len(shape)


def clean_parameter_name(name: str) -> str:
    """A parameter / module name without the FSDP and checkpoint wrapper segments."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def is_fsdp_wrapped(model: nn.Module) -> bool:
    """Whether any submodule of ``model`` is an FSDP1 unit."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


# --------------------------------------------------------------------------------------------------
# Lightning strategies
# --------------------------------------------------------------------------------------------------

class SuiteFSDPPrecision(FSDPPrecision):
    """Lightning's FSDP precision plugin, with gradient clipping by the global norm. Lightning's refuses
    to clip under FSDP, and a plain ``clip_grad_norm_`` over the local shards would scale each rank's
    shard by that rank's partial norm; the root FSDP module computes the norm over all shards."""

    root: nn.Module | None = None

    def clip_grad_by_norm(self, optimizer: torch.optim.Optimizer, clip_val: float | int) -> None:
        if self.root is None:
            raise RuntimeError("FSDP gradient clipping was called before the model was wrapped")
        self.root.clip_grad_norm_(clip_val)


class SuiteFSDPStrategy(LightningFSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1) with what this suite needs:

    - the wrap policy is computed from the model at wrap time (:func:`fsdp_wrap_policy`, so after
      activation checkpointing), whatever LightningModule holds the blocks;
    - parameter shapes are recorded before flattening (:func:`record_parameter_shapes`) for the
      weight-decay groups of :func:`core.training.parameter_groups`;
    - gradient clipping by global norm (:class:`SuiteFSDPPrecision`);
    - ``trainer.validate`` / ``trainer.test`` after ``fit`` reuse the root FSDP unit built in fit
      (Lightning would skip wrapping a module whose blocks are already units, leaving the root's
      parameters as flat shards);
    - CPU (gloo), for tests and debugging: Lightning passes ``device_id=None`` there, which FSDP1
      rejects without an accelerator, so the CPU wrap is done here with ``device_id=cpu``. Lightning
      refuses FSDP with ``accelerator="cpu"`` only for its own class, not for subclasses.
    """

    @property  # type: ignore[override]
    def precision_plugin(self) -> FSDPPrecision:
        return LightningFSDPStrategy.precision_plugin.fget(self)  # type: ignore[attr-defined]

    @precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        if plugin is not None and type(plugin) is FSDPPrecision:
            plugin = SuiteFSDPPrecision(plugin.precision, plugin.scaler)
        LightningFSDPStrategy.precision_plugin.fset(self, plugin)  # type: ignore[attr-defined]

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        # validate / test after fit hand Lightning's strategy the bare LightningModule again, whose blocks
        # are FSDP units already; Lightning then skips wrapping, which would leave the root unit's
        # parameters (embedding, head) as flat shards nobody gathers. The root built in fit is reused.
        root = model.__dict__.get("_suite_fsdp_root")
        if root is not None and root.module is model:
            self.kwargs.pop("auto_wrap_policy", None)
            return self._with_clipping(root)
        lightning_module = model
        if not is_fsdp_wrapped(model):
            record_parameter_shapes(model)
            policy = fsdp_wrap_policy(model)
            if self.root_device.type == "cpu":
                self.kwargs.pop("auto_wrap_policy", None)  # applied here; Lightning would warn it is unused
                kwargs = dict(self.kwargs)
                if kwargs.pop("sync_module_states", False):  # FSDP1 does it on GPUs only
                    for tensor in [*model.parameters(), *model.buffers()]:
                        torch.distributed.broadcast(tensor.data, src=0)
                model = FullyShardedDataParallel(
                    module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                    auto_wrap_policy=policy, **kwargs)
            else:
                self.kwargs["auto_wrap_policy"] = policy
        else:  # wrapped by the user: Lightning would warn that the policy is unused
            self.kwargs.pop("auto_wrap_policy", None)
        model = super()._setup_model(model)
        if isinstance(model, FullyShardedDataParallel):
            # A plain attribute, not a submodule (that would make the module contain its own wrapper).
            lightning_module.__dict__["_suite_fsdp_root"] = model
        return self._with_clipping(model)

    def _with_clipping(self, root: nn.Module) -> nn.Module:
        plugin = self.precision_plugin
        if isinstance(plugin, SuiteFSDPPrecision):
            plugin.root = root
        return root


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    getter = getattr(cfg, "get", None)
    return getter(key, default) if getter is not None else getattr(cfg, key, default)


def _to_dict(node: Any) -> dict[str, Any]:
    if node is None:
        return {}
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        return dict(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]
    return dict(node)


def build_strategy(trainer_cfg: Any) -> str | Any:
    """The Lightning strategy for the ``trainer`` config (a DictConfig or a dict).

    - ``auto``: Lightning's choice (one device, or DDP for several); returned as the string.
    - ``ddp``: DDPStrategy (gradients all-reduced in buckets that alias the gradients).
    - ``fsdp``: FSDP1 with per-block units, :func:`fsdp_mixed_precision` for ``trainer.precision``,
      sharded checkpoints by default; ``trainer.fsdp`` may set ``sharding_strategy`` (FULL_SHARD,
      SHARD_GRAD_OP, HYBRID_SHARD, NO_SHARD), ``state_dict_type`` (sharded, full) and ``cpu_offload``.
      On CPU (gloo) only ``32-true``: Lightning's FSDP autocast is CUDA-only.
    """
    name = str(_get(trainer_cfg, "strategy", "auto")).lower()
    if name not in STRATEGIES:
        raise ValueError(f"trainer.strategy={name!r} is not one of {list(STRATEGIES)} (auto: one device or "
                         "Lightning's DDP; ddp: data parallel; fsdp: fully sharded data parallel)")
    if name == "auto":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(gradient_as_bucket_view=True)

    fsdp_cfg = _to_dict(_get(trainer_cfg, "fsdp"))
    known = {"sharding_strategy", "state_dict_type", "cpu_offload"}
    unknown = sorted(set(fsdp_cfg) - known)
    if unknown:
        raise ValueError(f"trainer.fsdp: unknown key(s) {unknown}; known keys: {sorted(known)}")
    sharding = str(fsdp_cfg.get("sharding_strategy", "FULL_SHARD")).upper()
    if sharding not in FSDP_SHARDING:
        raise ValueError(f"trainer.fsdp.sharding_strategy={sharding!r} is not one of {list(FSDP_SHARDING)}")
    state_dict_type = str(fsdp_cfg.get("state_dict_type", "sharded")).lower()
    if state_dict_type not in FSDP_STATE_DICT:
        raise ValueError(f"trainer.fsdp.state_dict_type={state_dict_type!r} is not one of {list(FSDP_STATE_DICT)}")
    precision = str(_get(trainer_cfg, "precision", "32-true"))
    accelerator = str(_get(trainer_cfg, "accelerator", "auto")).lower()
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and fsdp_mixed_precision(precision) is not None:
        raise ValueError(f"trainer.strategy=fsdp on CPU supports precision=32-true only (got {precision!r}): "
                         "Lightning's FSDP mixed precision uses CUDA autocast")
    return SuiteFSDPStrategy(
        mixed_precision=fsdp_mixed_precision(precision),
        sharding_strategy=sharding,
        state_dict_type=state_dict_type,
        cpu_offload=bool(fsdp_cfg.get("cpu_offload", False)),
        # Rank 0's initial weights everywhere (DDP does this by default): the ranks build the model from
        # the same seed, but anything that drew random numbers on one rank only before (data
        # preparation done by rank 0, say) would otherwise leave each shard from a different init.
        sync_module_states=True,
    )


def data_parallel_size(trainer_cfg: Any) -> int:
    """How many processes share the data: devices per node times ``num_nodes``.

    ``devices`` may be an int, a list of device indices, ``-1`` / ``"auto"`` (all visible GPUs, or 1 on
    CPU). Domains size their training sets with it: ``max_steps * batch_size * data_parallel_size``.
    """
    devices = _get(trainer_cfg, "devices", 1)
    nodes = int(_get(trainer_cfg, "num_nodes", 1) or 1)
    accelerator = str(_get(trainer_cfg, "accelerator", "auto")).lower()
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, str) and "," in devices:
        devices = [d for d in devices.split(",") if d.strip()]
    if isinstance(devices, Iterable) and not isinstance(devices, str):
        count = len(list(devices))
    elif devices in (-1, "auto"):
        count = torch.cuda.device_count() if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else 1
    elif isinstance(devices, int) and devices >= 1:
        count = devices
    else:
        raise ValueError(f"trainer.devices={devices!r}: use a positive int, -1 / 'auto', or a list of device indices")
    return max(1, count) * nodes


def activation_checkpointing_callback(trainer_cfg: Any) -> Any | None:
    """The callback applying ``trainer.activation_checkpointing`` to the LightningModule before the
    strategy wraps it, or None when it is off."""
    mode, every_n = parse_activation_checkpointing(_get(trainer_cfg, "activation_checkpointing", False))
    if mode == "none":
        return None
    return ActivationCheckpointing(mode, every_n)


class ActivationCheckpointing(Callback):
    """Applies :func:`apply_activation_checkpointing` to the LightningModule in ``setup``: after the
    module is built, before DDP / FSDP wrap it (Lightning calls ``setup`` before ``configure_model`` and
    the strategy's wrapping), for any module holding :class:`core.backbone.Block` s. Once per module."""

    def __init__(self, mode: str = "full", every_n: int = 2) -> None:
        if mode not in ACTIVATION_CHECKPOINTING_MODES:
            raise ValueError(f"activation checkpointing mode {mode!r} is not one of {list(ACTIVATION_CHECKPOINTING_MODES)}")
        self.mode = mode
        self.every_n = every_n
        self.wrapped = 0

    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        if self.mode == "none" or checkpointed_blocks(pl_module):
            return
        self.wrapped = apply_activation_checkpointing(pl_module, self.mode, self.every_n)


# --------------------------------------------------------------------------------------------------
# torch.compile per block
# --------------------------------------------------------------------------------------------------

COMPILED_ATTR = "_ssm_suite_compiled"  # on a compiled block: its _CompiledForward


@dataclass
class _CompiledForward:
    """A block's compiled forward, with the block it was compiled for and the backend."""

    owner: int  # id() of the block
    backend: str
    fn: Any


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every residual block of ``model`` in place: the module tree, parameter names and
    ``state_dict`` keys stay as they are, so checkpoints and exports do not change. A checkpoint-wrapped
    block is compiled with its wrapper, so the recompute runs compiled too. Calls with an inference cache
    (generation) stay eager; a ``copy.deepcopy`` of a compiled model compiles its own blocks on first use.

    Per block, as torchtitan does: each block kind compiles once (blocks of one kind share code and
    shapes), far faster than tracing the whole model, and the embedding, the final norm and the chunked
    LM loss stay eager. What it buys on a GPU: the elementwise ops around the Triton kernels (casts,
    softplus, gates, residual adds) fuse, and fewer launches leave Python less to do per step. The
    kernels themselves are custom ops with fake implementations, so they sit in the graphs unbroken.
    Returns the number of blocks compiled; raises if ``model`` has no block or is already compiled.
    """
    sites = [m for m in model.modules() if _is_checkpointed_block(m)]
    inside = {id(m._checkpoint_wrapped_module) for m in sites}
    sites += [m for m in model.modules() if isinstance(m, Block) and id(m) not in inside]
    if not sites:
        raise ValueError(f"compile_blocks: {type(model).__name__} contains no core.backbone.Block")
    if any(getattr(m, COMPILED_ATTR, None) is not None for m in sites):
        raise ValueError("compile_blocks: the model's blocks are already compiled (apply it once)")
    for module in sites:
        setattr(module, COMPILED_ATTR, _compiled_forward(module, backend))
        # A bound method (not a closure): copy.deepcopy rebinds it to the copy.
        module.forward = types.MethodType(_dispatching_forward, module)
    return len(sites)


def _compiled_forward(module: nn.Module, backend: str) -> _CompiledForward:
    return _CompiledForward(id(module), backend,
                            torch.compile(types.MethodType(type(module).forward, module), backend=backend))


def _dispatching_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A compiled block's forward: cache-free calls (training, evaluation) run compiled, calls with an
    inference cache (generation) run eagerly, since a decoding step changes the cache's host-side
    counters every call, which would recompile the graph each step."""
    cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
    if cache is not None:
        return type(self).forward(self, *args, **kwargs)
    compiled = getattr(self, COMPILED_ATTR)
    if compiled.owner != id(self):  # a deep copy carries its original's compiled function: compile its own
        compiled = _compiled_forward(self, compiled.backend)
        setattr(self, COMPILED_ATTR, compiled)
    return compiled.fn(*args, **kwargs)


def compile_callback(trainer_cfg: Any) -> Any | None:
    """The callback applying ``trainer.compile`` (with ``trainer.compile_backend``, default inductor) to
    the LightningModule's blocks, or None when it is off. Refused with ``strategy=fsdp``: FSDP1 flattens
    each unit's parameters, which per-block compiled graphs would see through its hooks."""
    value = _get(trainer_cfg, "compile", False)
    if not isinstance(value, bool):
        raise ValueError(f"trainer.compile={value!r}: use true or false (trainer.compile_backend picks the backend)")
    if not value:
        return None
    backend = _get(trainer_cfg, "compile_backend", "inductor") or "inductor"
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"trainer.compile_backend={backend!r} is not a torch.compile backend; use one of "
                         f"{sorted(torch._dynamo.list_backends(exclude_tags=()))} (inductor for speed)")
    if str(_get(trainer_cfg, "strategy", "auto")) == "fsdp":
        raise ValueError("trainer.compile=true is not supported with trainer.strategy=fsdp (FSDP1's flat "
                         "parameters); use strategy=ddp or auto, or trainer.compile=false")
    return CompileBlocks(backend)


class CompileBlocks(Callback):
    """Applies :func:`compile_blocks` to the LightningModule in ``setup``, after activation checkpointing
    (put this callback after :class:`ActivationCheckpointing`) and before DDP wraps it. Once per module."""

    def __init__(self, backend: str = "inductor") -> None:
        self.backend = backend
        self.compiled = 0

    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        if any(getattr(m, COMPILED_ATTR, None) is not None for m in pl_module.modules()):
            return
        self.compiled = compile_blocks(pl_module, self.backend)


__all__ = [
    "ACTIVATION_CHECKPOINTING_MODES", "STRATEGIES", "ActivationCheckpointing", "CompileBlocks",
    "activation_checkpointing_callback", "compile_blocks", "compile_callback",
    "apply_activation_checkpointing", "build_strategy", "checkpointed_blocks", "clean_parameter_name",
    "data_parallel_size", "fp32_mixer_classes", "fsdp_mixed_precision", "fsdp_units",
    "fsdp_wrap_policy", "is_fsdp_wrapped", "original_ndim", "parse_activation_checkpointing",
    "record_parameter_shapes", "SuiteFSDPPrecision", "SuiteFSDPStrategy",
]
