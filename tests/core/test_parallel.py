"""Multi-device training (core/parallel.py and its wiring in core/training.py, core/checkpoint.py).

- Activation checkpointing changes nothing but memory: loss and gradients equal the plain model's for a
  hybrid of Mamba-2, attention, MoE and Mamba-1 blocks, the blocks really are recomputed, and names,
  exports and generation are unchanged.
- Strategy construction from the trainer config, and its errors.
- On CPU with the gloo backend, through Lightning's Trainer built by ``build_trainer``: two DDP
  processes with half the batch each take the same two optimizer steps as one process on the whole
  batch; two FSDP processes (per-block units, every other block checkpointed, clipping active) take the
  same four steps; the FSDP sharded checkpoint of step 2 resumes in ONE process (resharded model and
  AdamW state, the data stream continuing at the right sample) and reaches the same step-4 weights; the
  same checkpoint consolidates into an export holding the step-2 weights. FSDP's bf16-mixed policy
  keeps the SSM mixers' parameters (A_log, D, dt bias) in fp32 while the other blocks compute in bf16.

This file is also the worker script of the distributed test: ``python tests/core/test_parallel.py
worker <out> two`` with torchrun-style environment variables (RANK, WORLD_SIZE, ...), so that
Lightning joins the processes started here instead of launching its own, and pytest itself never forks.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.backbone import Block, CausalLM
from core.config import AttentionConfig, Mamba1Config, Mamba2Config, ModelConfig, MoEConfig
from core.parallel import clean_parameter_name

# --------------------------------------------------------------------------------------------------
# The model and data shared by the tests and the workers
# --------------------------------------------------------------------------------------------------

PER_RANK_BATCH = 2
SEQ_LEN = 16
STEPS = 4
CLIP = 0.5  # below the tiny model's gradient norm: clipping is active, so a wrong FSDP norm would show


def hybrid_config() -> ModelConfig:
    """Mamba-2, attention, MoE, Mamba-1: every kind of block the tests must cover. The MoE's auxiliary
    losses are off in the distributed test only (see ``distributed_config``)."""
    return ModelConfig(
        d_model=32, pattern="M*ES", vocab_size=64, pad_vocab_size_multiple=8,
        mamba2=Mamba2Config(d_state=16, headdim=16, ngroups=1, chunk_size=8),
        attention=AttentionConfig(n_heads=4, n_kv_heads=2),
        moe=MoEConfig(n_experts=4, top_k=2, hidden_size=32),
        mamba1=Mamba1Config(d_state=8),
    )


def distributed_config() -> ModelConfig:
    config = hybrid_config()
    # The load-balancing and z losses are nonlinear in the batch (a product of batch means), so half
    # batches would not sum to the whole batch's; the cross-entropy (a mean over equal token counts) does.
    config.moe.load_balancing_coef = 0.0
    config.moe.z_loss_coef = 0.0
    return config


class RandomWindows(torch.utils.data.Dataset):
    """``{"input_ids", "labels"}`` windows of random tokens, seeded by index (as the domains' are)."""

    def __init__(self, num_samples: int, vocab: int = 64, seed: int = 1000) -> None:
        self.num_samples, self.vocab, self.seed = num_samples, vocab, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, self.vocab, (SEQ_LEN + 1,), generator=torch.Generator().manual_seed(self.seed + index))
        return {"input_ids": ids[:-1], "labels": ids[1:]}


def trainer_config(strategy: str, devices: int, ac: object = False) -> object:
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "accelerator": "cpu", "devices": devices, "num_nodes": 1, "strategy": strategy, "precision": "32-true",
        "activation_checkpointing": ac, "max_steps": STEPS, "val_check_interval": 2, "limit_val_batches": 1.0,
        "gradient_clip_val": CLIP, "log_every_n_steps": 1, "num_workers": 0, "resume": None,
        "tensorboard": False,
    })


def fit(strategy: str, devices: int, batch: int, run_dir: Path, max_steps: int = STEPS, ac: object = False,
        ckpt: str | None = None, snapshots: dict[int, dict[str, torch.Tensor]] | None = None):
    """Train the distributed config with ``build_trainer``; returns (trainer, module)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from core.training import CausalLMModule, OptimConfig, ResumableSampler, build_trainer, checkpoint_step

    L.seed_everything(0)
    cfg = trainer_config(strategy, devices, ac)
    cfg.max_steps = max_steps
    # eps=1e-6 (not 1e-8): Adam divides each gradient entry by its own magnitude, so an entry whose
    # true gradient is ~0 (one router weight here: 2e-9) moves by lr * noise / (|noise| + eps), and a
    # different summation order of the same gradient moves it visibly. Gradient scale bugs, which Adam
    # would hide, are caught by comparing the logged norm before clipping.
    module = CausalLMModule(distributed_config(), OptimConfig(lr=1e-2, eps=1e-6, warmup_steps=1, max_steps=STEPS))
    world = devices
    data = RandomWindows(STEPS * batch * world)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, drop_last=True,
                                         sampler=ResumableSampler(len(data), start=checkpoint_step(ckpt) * batch))

    # 4 validation windows: Lightning splits them between the processes (2 each) and the token-weighted
    # val/loss is synchronized, so it equals the single process's.
    val_loader = torch.utils.data.DataLoader(RandomWindows(4, seed=5000), batch_size=4 // world)

    class Snapshot(Callback):
        """Weights at the start and after steps 2 and 4 (single device only), every step's gradient norm,
        val losses."""

        def on_train_start(self, trainer, pl_module):
            if snapshots is not None:
                snapshots[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            grad_norms[trainer.global_step] = float(trainer.callback_metrics["train/grad_norm"])
            if snapshots is not None and trainer.global_step in (2, 4):
                snapshots[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

        def on_validation_end(self, trainer, pl_module):
            if trainer.state.fn == "fit":
                val_losses[trainer.global_step] = float(trainer.callback_metrics["val/loss"])

    grad_norms: dict[int, float] = {}
    val_losses: dict[int | str, float] = {}
    trainer = build_trainer(cfg, run_dir, extra_callbacks=[Snapshot()])
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=val_loader, ckpt_path=ckpt)
    # As the domains do after fit: validate again (under FSDP, Lightning sets the wrapped model up anew).
    val_losses["after"] = float(trainer.validate(module, dataloaders=val_loader, verbose=False)[0]["val/loss"])
    trainer.grad_norms, trainer.val_losses = grad_norms, val_losses
    return trainer, module


def mixed_precision_probe(rank: int) -> dict[str, object]:
    """FSDP with the bf16-mixed policy under CPU autocast (Lightning's FSDP autocast is CUDA-only, so
    torch's FSDP directly): the dtype of every parameter as its module runs, the loss beside the
    unsharded model's under the same autocast, and the dtypes of the sharded parameters and gradients."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from core.parallel import apply_activation_checkpointing, fsdp_mixed_precision, fsdp_wrap_policy

    torch.manual_seed(0)
    model = CausalLM(hybrid_config())
    reference = copy.deepcopy(model)
    unwrapped = copy.deepcopy(model)
    plain = FullyShardedDataParallel(unwrapped, auto_wrap_policy=fsdp_wrap_policy(unwrapped),
                                     use_orig_params=True, mixed_precision=fsdp_mixed_precision("bf16-mixed"),
                                     device_id=torch.device("cpu"))
    apply_activation_checkpointing(model, "every_n", 2)
    seen: dict[str, torch.dtype] = {}
    for name, module in model.named_modules():
        def record(mod, args, prefix=clean_parameter_name(name)):
            for pname, param in mod.named_parameters(recurse=False):
                seen[f"{prefix}.{pname}"] = param.dtype
        module.register_forward_pre_hook(record)
    sharded = FullyShardedDataParallel(model, auto_wrap_policy=fsdp_wrap_policy(model), use_orig_params=True,
                                       mixed_precision=fsdp_mixed_precision("bf16-mixed"), device_id=torch.device("cpu"))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sharded(ids, labels=ids).loss
        loss_ref = reference(ids, labels=ids).loss
        loss_plain = plain(ids, labels=ids).loss
    loss.backward()
    loss_plain.backward()
    stored = {(str(p.dtype), None if p.grad is None else str(p.grad.dtype)) for p in sharded.parameters()}
    # The same sharding without checkpointing: the recompute (which runs the fp32 mixer units nested in
    # a checkpointed block again inside the backward) must give the same gradient shards.
    plain_grads = {clean_parameter_name(n): q.grad for n, q in plain.named_parameters()}
    grads = [(p.grad, plain_grads[clean_parameter_name(n)]) for n, p in sharded.named_parameters() if p.grad is not None]
    ac_diff = max(float((a - b).norm() / b.norm().clamp(min=1e-12)) for a, b in grads)
    return {"seen": seen, "loss": float(loss.detach()), "loss_ref": float(loss_ref.detach()), "stored": stored,
            "loss_plain": float(loss_plain.detach()), "ac_grad_diff": ac_diff, "n_grads": len(grads)}


def worker(out: Path, mode: str) -> None:
    """One process of the distributed test (see the module docstring)."""
    from core.training import gather_model

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    if mode == "two":
        trainer, module = fit("ddp", 2, PER_RANK_BATCH, out / "ddp", max_steps=2, ac=True)
        assert trainer.global_step == 2
        state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
        torch.save({"state": state, "grad_norms": trainer.grad_norms, "val": trainer.val_losses}, out / f"ddp_rank{rank}.pt")
        trainer, module = fit("fsdp", 2, PER_RANK_BATCH, out / "fsdp", ac=2)
        assert trainer.global_step == STEPS
        full = gather_model(trainer, module.model)
        if rank == 0:
            torch.save({"state": full.state_dict(), "grad_norms": trainer.grad_norms, "val": trainer.val_losses},
                       out / "fsdp2.pt")
        else:
            assert full is None
        torch.save(mixed_precision_probe(rank), out / f"mixed_rank{rank}.pt")
    else:
        raise ValueError(mode)


# --------------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------------

def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(ids, labels=ids.roll(-1, dims=1))
    out.loss.backward()
    return out.loss.detach(), {clean_parameter_name(n): p.grad.detach().clone()
                               for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_loss_and_grads(loss, grads, loss_ref, grads_ref) -> None:
    """A wrapped model (checkpointed, compiled) against the plain one: the same loss and every gradient."""
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-7, msg=name)


def _saved_tensor_count(model: torch.nn.Module, ids: torch.Tensor) -> int:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids).loss
    return count


def test_activation_checkpointing_keeps_loss_and_gradients():
    from core.parallel import apply_activation_checkpointing, checkpointed_blocks

    plain = CausalLM(hybrid_config())  # MoE aux losses on: they must survive the recompute too
    checkpointed = copy.deepcopy(plain)
    assert apply_activation_checkpointing(checkpointed, "full") == 4 == checkpointed_blocks(checkpointed)
    ids = torch.randint(0, 64, (2, 24))

    calls = {"n": 0}
    # A pre-hook: the recompute stops as soon as the last saved tensor is rebuilt (torch's early stop),
    # which is inside the mixer, so a forward (post) hook would not see it.
    hook = checkpointed.backbone.layers[0].mixer.register_forward_pre_hook(
        lambda *a: calls.__setitem__("n", calls["n"] + 1))
    loss_ref, grads_ref = _loss_and_grads(plain, ids)
    loss, grads = _loss_and_grads(checkpointed, ids)
    hook.remove()
    assert calls["n"] == 2  # the forward, then the recompute in the backward
    _assert_same_loss_and_grads(loss, grads, loss_ref, grads_ref)
    assert len(grads) == len(list(plain.parameters()))
    # What the backward keeps: only the blocks' inputs instead of every intermediate.
    assert _saved_tensor_count(checkpointed, ids) < _saved_tensor_count(plain, ids) / 3

    # The export's keys and attribute access through the wrappers are unchanged; parameter names only
    # gain the wrapper's segment.
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    names = [clean_parameter_name(n) for n, _ in checkpointed.named_parameters()]
    assert names == [n for n, _ in plain.named_parameters()]
    assert checkpointed.backbone.layers[1].mixer is not None and checkpointed.backbone.layers[3].char == "S"


def test_activation_checkpointing_every_n_and_other_backbones():
    from core.bidirectional import BidirectionalBackbone
    from core.multiscale import MultiScaleConfig, MultiScaleLM
    from core.parallel import apply_activation_checkpointing, checkpointed_blocks, fsdp_units

    model = CausalLM(hybrid_config())
    assert apply_activation_checkpointing(model, "every_n", every_n=2) == 2
    wrapped = [type(layer).__name__ for layer in model.backbone.layers]
    assert wrapped == ["CheckpointWrapper", "Block", "CheckpointWrapper", "Block"]
    # FSDP units: the wrappers (outside the checkpoint) and the bare blocks, never a wrapped block itself.
    units = fsdp_units(model)
    assert [type(u).__name__ for u in units] == wrapped
    with pytest.raises(ValueError, match="already checkpointed"):
        apply_activation_checkpointing(model, "full")
    assert apply_activation_checkpointing(CausalLM(hybrid_config()), "none") == 0
    with pytest.raises(ValueError, match="no core.backbone.Block"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not one of"):
        apply_activation_checkpointing(CausalLM(hybrid_config()), "selective")

    base = ModelConfig(d_model=16, pattern="S-", vocab_size=32, mamba1=Mamba1Config(d_state=4))
    multiscale = MultiScaleLM(MultiScaleConfig(model=base, pools=[2], expand=2))
    reference = copy.deepcopy(multiscale)
    n_blocks = sum(isinstance(m, Block) for m in multiscale.modules())
    assert apply_activation_checkpointing(multiscale) == n_blocks == checkpointed_blocks(multiscale) == 4
    ids = torch.randint(0, 32, (2, 8))
    _assert_same_loss_and_grads(*_loss_and_grads(multiscale, ids), *_loss_and_grads(reference, ids))
    bidirectional = BidirectionalBackbone(base)
    assert apply_activation_checkpointing(bidirectional) == 4  # both directions' blocks


def test_checkpointed_model_generates_and_exports_like_the_plain_one(tmp_path):
    from core.checkpoint import load_export, save_export
    from core.generate import generate
    from core.parallel import apply_activation_checkpointing

    plain = CausalLM(hybrid_config()).eval()
    checkpointed = copy.deepcopy(plain)
    apply_activation_checkpointing(checkpointed)
    prompts = [[1, 2, 3, 4], [5, 6]]
    a = generate(plain, prompts, max_new_tokens=4, temperature=0.0, seed=0).sequences()
    b = generate(checkpointed, prompts, max_new_tokens=4, temperature=0.0, seed=0).sequences()
    assert a == b
    loaded = load_export(save_export(checkpointed, tmp_path / "export"))
    for (name, p), (_, q) in zip(plain.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_compiled_blocks_keep_loss_gradients_keys_and_generation(tmp_path):
    # aot_eager traces each block through dynamo and AOT autograd as inductor does, without generating
    # code: the CPU test of the graph capture (custom ops, MoE aux losses, the checkpoint wrapper).
    from core.generate import generate
    from core.parallel import COMPILED_ATTR, apply_activation_checkpointing, compile_blocks

    plain = CausalLM(hybrid_config())
    ids = torch.randint(0, 64, (2, 24))
    loss_ref, grads_ref = _loss_and_grads(plain, ids)
    for checkpointing in (False, True):
        model = copy.deepcopy(plain)
        if checkpointing:
            apply_activation_checkpointing(model, "every_n", every_n=2)
        assert compile_blocks(model, backend="aot_eager") == 4
        compiled = [m for m in model.modules() if getattr(m, COMPILED_ATTR, None) is not None]
        expected = ["CheckpointWrapper", "Block", "CheckpointWrapper", "Block"] if checkpointing else ["Block"] * 4
        assert sorted(type(m).__name__ for m in compiled) == sorted(expected)
        _assert_same_loss_and_grads(*_loss_and_grads(model, ids), loss_ref, grads_ref)
        assert model.state_dict().keys() == plain.state_dict().keys()
        with pytest.raises(ValueError, match="already compiled"):
            compile_blocks(model, backend="aot_eager")

    # Generation: blocks called with their cache (the sequence mixers) take the eager forward, so a decode
    # step's changing counters never recompile a graph; cache-free blocks (MLP / MoE) stay compiled.
    model = copy.deepcopy(plain).eval()
    compile_blocks(model, backend="aot_eager")
    compiled_calls = []
    for index, block in enumerate(model.backbone.layers):
        compiled = getattr(block, COMPILED_ATTR)
        inner = compiled.fn
        compiled.fn = lambda *a, _i=index, _f=inner, **k: compiled_calls.append(_i) or _f(*a, **k)
    prompts = [[1, 2, 3, 4], [5, 6]]
    a = generate(plain.eval(), prompts, max_new_tokens=5, temperature=0.0, seed=0).sequences()
    b = generate(model, prompts, max_new_tokens=5, temperature=0.0, seed=0).sequences()
    assert a == b
    assert set(compiled_calls) == {i for i, c in enumerate(model.config.pattern) if c in "-E"}
    compiled_calls.clear()
    model(torch.randint(0, 64, (1, 8)))  # no cache: every block compiled
    assert compiled_calls == [0, 1, 2, 3]

    # A deep copy of a compiled model runs its own blocks (its own weights), compiled afresh on first use.
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    compiled_calls.clear()
    probe = torch.randint(0, 64, (1, 8))
    reference = copy.deepcopy(plain).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(0.5)
    torch.testing.assert_close(twin(probe).logits, reference(probe).logits, rtol=1e-5, atol=1e-6)
    assert compiled_calls == []  # the copy did not run the original's compiled functions
    assert all(getattr(b, COMPILED_ATTR).owner == id(b) for b in twin.backbone.layers)
    with pytest.raises(ValueError, match="no core.backbone.Block"):
        compile_blocks(torch.nn.Linear(2, 2))

    # The audio domain's multi-scale U-Net: blocks at every level, compiled, same loss and gradients.
    from core.multiscale import MultiScaleConfig, MultiScaleLM

    base = ModelConfig(d_model=16, pattern="S-", vocab_size=32, mamba1=Mamba1Config(d_state=4))
    multiscale = MultiScaleLM(MultiScaleConfig(model=base, pools=[2], expand=2))
    reference = copy.deepcopy(multiscale)
    assert compile_blocks(multiscale, backend="aot_eager") == sum(isinstance(m, Block) for m in reference.modules())
    ids = torch.randint(0, 32, (2, 8))
    _assert_same_loss_and_grads(*_loss_and_grads(multiscale, ids), *_loss_and_grads(reference, ids))


def test_compile_callback_from_the_trainer_config():
    from omegaconf import OmegaConf

    from core.parallel import CompileBlocks, compile_callback

    assert compile_callback(OmegaConf.create({"compile": False})) is None
    assert compile_callback(OmegaConf.create({})) is None
    callback = compile_callback(OmegaConf.create({"compile": True}))
    assert isinstance(callback, CompileBlocks) and callback.backend == "inductor"
    assert compile_callback(OmegaConf.create({"compile": True, "compile_backend": "aot_eager"})).backend == "aot_eager"
    with pytest.raises(ValueError, match="not a torch.compile backend"):
        compile_callback(OmegaConf.create({"compile": True, "compile_backend": "inductr"}))
    with pytest.raises(ValueError, match="strategy=fsdp"):
        compile_callback(OmegaConf.create({"compile": True, "strategy": "fsdp"}))
    with pytest.raises(ValueError, match="use true or false"):
        compile_callback(OmegaConf.create({"compile": "yes"}))


def test_parse_activation_checkpointing():
    from core.parallel import parse_activation_checkpointing

    assert parse_activation_checkpointing(False) == parse_activation_checkpointing(None) == ("none", 1)
    assert parse_activation_checkpointing("none") == ("none", 1)
    assert parse_activation_checkpointing(True) == parse_activation_checkpointing("full") == ("full", 1)
    assert parse_activation_checkpointing(1) == ("full", 1)
    assert parse_activation_checkpointing(3) == parse_activation_checkpointing("every_3") == ("every_n", 3)
    for bad in (0, -2, "sometimes", "every_x", 1.5):
        with pytest.raises(ValueError, match="activation_checkpointing"):
            parse_activation_checkpointing(bad)


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------

def test_build_strategy_from_the_trainer_config():
    from lightning.pytorch.strategies import DDPStrategy
    from torch.distributed.fsdp import ShardingStrategy

    from core.layers.mamba1 import Mamba1
    from core.layers.mamba2 import Mamba2
    from core.parallel import SuiteFSDPStrategy, build_strategy

    assert build_strategy({"strategy": "auto"}) == "auto"
    assert isinstance(build_strategy({"strategy": "ddp"}), DDPStrategy)
    fsdp = build_strategy({"strategy": "fsdp", "accelerator": "gpu", "precision": "bf16-mixed"})
    assert isinstance(fsdp, SuiteFSDPStrategy)
    assert fsdp._state_dict_type == "sharded" and fsdp.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert fsdp.kwargs["sync_module_states"] and fsdp.kwargs["use_orig_params"]
    mp = fsdp.mixed_precision
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert Mamba1 in mp._module_classes_to_ignore and Mamba2 in mp._module_classes_to_ignore
    full = build_strategy({"strategy": "fsdp", "accelerator": "gpu", "precision": "32-true",
                           "fsdp": {"state_dict_type": "full", "sharding_strategy": "shard_grad_op"}})
    assert full.mixed_precision is None and full._state_dict_type == "full"
    assert full.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
    assert isinstance(build_strategy({"strategy": "fsdp", "accelerator": "cpu", "precision": "32-true"}),
                      SuiteFSDPStrategy)

    with pytest.raises(ValueError, match=r"'deepspeed' is not one of \['auto', 'ddp', 'fsdp'\]"):
        build_strategy({"strategy": "deepspeed"})
    with pytest.raises(ValueError, match="unknown key"):
        build_strategy({"strategy": "fsdp", "accelerator": "gpu", "fsdp": {"shard": 1}})
    with pytest.raises(ValueError, match="sharding_strategy"):
        build_strategy({"strategy": "fsdp", "accelerator": "gpu", "fsdp": {"sharding_strategy": "zero3"}})
    with pytest.raises(ValueError, match="32-true only"):
        build_strategy({"strategy": "fsdp", "accelerator": "cpu", "precision": "bf16-mixed"})
    with pytest.raises(ValueError, match="unsupported precision"):
        build_strategy({"strategy": "fsdp", "accelerator": "gpu", "precision": "8-mixed"})


def test_data_parallel_size():
    from core.parallel import data_parallel_size

    assert data_parallel_size({"devices": 1}) == 1
    assert data_parallel_size({"devices": 2, "num_nodes": 3}) == 6
    assert data_parallel_size({"devices": [0, 3]}) == 2
    assert data_parallel_size({"devices": "0,1,2"}) == 3
    assert data_parallel_size({"devices": "auto", "accelerator": "cpu"}) == 1
    with pytest.raises(ValueError, match="trainer.devices"):
        data_parallel_size({"devices": 0})


def test_sampler_is_left_alone_by_lightning_and_restarts_a_second_pass():
    from core.training import ResumableSampler

    sampler = ResumableSampler(12, start=2, rank=1, world_size=2)
    assert isinstance(sampler, torch.utils.data.DistributedSampler)  # Lightning does not re-shard it
    assert list(sampler) == [5, 7, 9, 11] and len(sampler) == 6
    first = ResumableSampler(12, start=2, rank=0, world_size=2)
    assert list(first) == [4, 6, 8, 10]
    with pytest.warns(UserWarning, match="second pass"):  # the resume offset applies to the first pass only
        assert list(first) == [0, 2, 4, 6, 8, 10]
    assert list(ResumableSampler(5)) == [0, 1, 2, 3, 4]  # no process group: rank 0 of 1


# --------------------------------------------------------------------------------------------------
# The distributed test: DDP and FSDP on gloo against one process
# --------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, mode: str, world: int) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "NODE_RANK": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        log = open(out / f"{mode}_rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, __file__, "worker", str(out), mode], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs: list[subprocess.Popen], out: Path, mode: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    for rank, proc in enumerate(procs):
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            code = "timeout"
        if code != 0:
            logs = "\n".join((out / f"{mode}_rank{r}.log").read_text()[-3000:] for r in range(len(procs)))
            raise AssertionError(f"worker {mode} rank {rank} failed ({code}):\n{logs}")


def _assert_same_weights(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str) -> None:
    assert state.keys() == reference.keys(), what
    for name, ref in reference.items():
        diff = (state[name].float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12)
        assert diff < 1e-6, f"{what}: {name} differs by {float(diff):.2e} (relative norm)"


def test_ddp_and_fsdp_on_gloo_equal_one_process_and_reshard(tmp_path):
    from core.checkpoint import consolidate_checkpoint, load_export
    from core.training import checkpoint_step

    procs = _launch(tmp_path, "two", 2)
    try:
        # Meanwhile, the reference: one process on the whole batch (2 x the per-rank batch), no checkpointing.
        snapshots: dict[int, dict[str, torch.Tensor]] = {}
        single, _ = fit("auto", 1, 2 * PER_RANK_BATCH, tmp_path / "single", snapshots=snapshots)
    finally:
        _wait(procs, tmp_path, "two")
    assert sorted(snapshots) == [0, 2, 4]
    moved = min(float((snapshots[2][k] - snapshots[0][k]).norm() / snapshots[0][k].norm()) for k in snapshots[0])
    # Every tensor moved by far more than the comparisons' 1e-6: matching weights are not just initial ones.
    assert moved > 2e-5

    norms = single.grad_norms
    assert sorted(norms) == [1, 2, 3, 4] and min(norms.values()) > CLIP  # clipping was active at every step

    val = single.val_losses
    assert sorted(val, key=str) == [2, 4, "after"] and val["after"] == pytest.approx(val[4], rel=1e-6)

    def check(name: str, steps: list[int], what: str) -> None:
        result = torch.load(tmp_path / name)
        for step in steps:  # the norm of the averaged gradient: a wrong scale or a local-shard norm shows
            assert result["grad_norms"][step] == pytest.approx(norms[step], rel=1e-5), f"{what}: step {step}"
        _assert_same_weights(result["state"], snapshots[steps[-1]], f"{what}, step {steps[-1]}")
        for step, loss in result["val"].items():
            assert loss == pytest.approx(val[steps[-1] if step == "after" else step], rel=1e-5), f"{what}: val {step}"

    for rank in range(2):
        check(f"ddp_rank{rank}.pt", [1, 2], f"DDP rank {rank} (2 x half batch, every block checkpointed)")
    check("fsdp2.pt", [1, 2, 3, 4], "FSDP on 2 processes (every other block checkpointed)")

    for rank in range(2):  # FSDP mixed precision: bf16 compute except the SSM mixers, fp32 storage and gradients
        probe = torch.load(tmp_path / f"mixed_rank{rank}.pt")
        seen = probe["seen"]
        for name in ("layers.0.mixer.A_log", "layers.0.mixer.D", "layers.0.mixer.dt_bias", "layers.0.mixer.in_proj.weight",
                     "layers.3.mixer.A_log", "layers.3.mixer.D"):
            assert seen[f"backbone.{name}"] == torch.float32, name
        for name in ("backbone.embedding.weight", "backbone.layers.0.norm.weight", "backbone.layers.1.mixer.q_proj.weight",
                     "backbone.layers.2.mixer.experts.gate_proj", "lm_head.weight"):
            assert seen[name] == torch.bfloat16, name
        assert probe["loss"] == pytest.approx(probe["loss_ref"], rel=1e-2)
        assert probe["loss"] == probe["loss_plain"] and probe["n_grads"] > 0 and probe["ac_grad_diff"] < 1e-5
        assert all(dtype == "torch.float32" and grad in (None, "torch.float32") for dtype, grad in probe["stored"])

    step2 = tmp_path / "fsdp" / "checkpoints" / "step2.ckpt"
    assert step2.is_dir() and len(list(step2.glob("*.distcp"))) == 2  # one shard file per rank
    assert checkpoint_step(str(step2)) == 2

    # Resume the 2-process checkpoint in this process: FSDP on one rank (a process group of 1, torn down
    # after), the whole batch, the sampler starting at the checkpoint's step.
    from core.training import gather_model

    environ = dict(os.environ)
    try:
        trainer, module = fit("fsdp", 1, 2 * PER_RANK_BATCH, tmp_path / "fsdp1", ckpt=str(step2))
        assert trainer.global_step == STEPS
        torch.save({"state": gather_model(trainer, module.model).state_dict(), "grad_norms": trainer.grad_norms,
                    "val": trainer.val_losses}, tmp_path / "fsdp1.pt")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    _assert_same_weights(load_export(consolidate_checkpoint(step2, tmp_path / "export")).state_dict(), snapshots[2],
                         "consolidated FSDP checkpoint, step 2")
    check("fsdp1.pt", [3, 4], "FSDP resumed from 2 processes on 1")


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
    worker(Path(sys.argv[2]), sys.argv[3])
