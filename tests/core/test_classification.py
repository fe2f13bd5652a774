"""Sequence classification and the bidirectional / reverse-complement-equivariant wrappers.

Equivariance is checked in float64 on random weights for each block family (Mamba-1, Hyena,
attention): y(rc(x)) == flip(y(x)) per position, and RC-invariant logits for both poolings, while the
causal model is not invariant (so the check can fail)."""

from __future__ import annotations

import pytest
import torch

from core.backbone import CausalLM
from core.bidirectional import BidirectionalBackbone, RCEquivariantBackbone, reverse_complement
from core.classification import ClassifierConfig, ClassifierModule, SequenceClassifier
from core.config import ModelConfig
from core.dna_presets import get_dna_preset

# 5 specials, then A C G T N: the DNA tokenizer's layout (domains.dna.tokenizer).
RC_MAP = torch.tensor([0, 1, 2, 3, 4, 8, 7, 6, 5, 9])


def tiny(family: str) -> ModelConfig:
    base = {"mamba1": "mamba1-dna-cpu", "hyena": "hyena-dna-cpu", "transformer": "transformer++-dna-cpu"}[family]
    overrides = {"d_model": 16}
    if family == "hyena":
        overrides["hyena"] = {"max_seqlen": 64, "filter_order": 8}
        overrides["mlp"] = {"hidden_size": 32}
    if family == "transformer":
        overrides["attention"] = {"n_heads": 2}
    return get_dna_preset(base, **overrides)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm()) if not a.requires_grad else float((a - b).detach().norm() / b.detach().norm())


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 10, (batch, length), generator=g)


@pytest.mark.parametrize("family", ["mamba1", "hyena", "transformer"])
def test_rc_equivariance(family: str):
    torch.manual_seed(0)
    config = tiny(family)
    encoder = RCEquivariantBackbone(config, RC_MAP).double()
    x = random_ids(2, 13)
    y, summary, _ = encoder(x)
    y_rc, summary_rc, _ = encoder(reverse_complement(x, RC_MAP))
    assert rel(y_rc, y.flip(1)) < 1e-12
    assert rel(summary_rc, summary) < 1e-12
    for pooling in ("mean", "last"):
        torch.manual_seed(1)
        model = SequenceClassifier(config, ClassifierConfig(n_classes=3, mode="rc", pooling=pooling),
                                   rc_map=RC_MAP).double()
        torch.nn.init.normal_(model.head.weight)
        a, b = model(x).logits, model(reverse_complement(x, RC_MAP)).logits
        assert rel(b, a) < 1e-12
    # The causal classifier is not invariant: the check above is not vacuous.
    torch.manual_seed(1)
    causal = SequenceClassifier(config, ClassifierConfig(n_classes=3, mode="causal")).double()
    torch.nn.init.normal_(causal.head.weight)
    assert rel(causal(reverse_complement(x, RC_MAP)).logits, causal(x).logits) > 1e-3


def test_rc_single_base_and_backward():
    torch.manual_seed(0)
    model = SequenceClassifier(tiny("mamba1"), ClassifierConfig(n_classes=2, mode="rc"), rc_map=RC_MAP)
    x = random_ids(3, 1)
    out = model(x, labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.encoder.backbone.embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("share", [False, True])
def test_bidirectional_sees_both_sides(share: bool):
    torch.manual_seed(0)
    config = tiny("transformer")
    encoder = BidirectionalBackbone(config, share=share)
    causal = RCEquivariantBackbone(config, RC_MAP).backbone  # a plain causal backbone
    x = random_ids(1, 9)
    changed = x.clone()
    changed[0, -1] = 5 if x[0, -1] != 5 else 6  # another last base
    with torch.no_grad():
        first = encoder(x)[0][:, 0]
        assert rel(encoder(changed)[0][:, 0], first) > 1e-4  # position 0 sees the end
        assert torch.equal(causal(changed)[0][:, 0], causal(x)[0][:, 0])  # a causal one does not
    assert (encoder.backward_backbone is None) == share


def test_load_backbone_from_a_causal_lm():
    torch.manual_seed(0)
    config = tiny("mamba1")
    lm = CausalLM(config)
    model = SequenceClassifier(config, ClassifierConfig(n_classes=2, mode="bidirectional"))
    model.load_backbone(lm.state_dict())
    x = random_ids(2, 7)
    for backbone in model.backbones():
        assert torch.equal(backbone(x)[0], lm.backbone(x)[0])
    with pytest.raises(ValueError, match="no backbone"):
        model.load_backbone({"head.weight": torch.zeros(2, 16)})
    wrong = CausalLM(tiny("transformer"))
    with pytest.raises(RuntimeError):
        model.load_backbone(wrong.state_dict())


def test_bad_configs():
    config = tiny("mamba1")
    with pytest.raises(ValueError, match="rc_map"):
        SequenceClassifier(config, ClassifierConfig(n_classes=2, mode="rc"))
    with pytest.raises(ValueError, match="involution"):
        RCEquivariantBackbone(config, torch.tensor([0, 1, 2, 3, 4, 8, 8, 6, 5, 9]))
    with pytest.raises(ValueError, match="mode"):
        ClassifierConfig(n_classes=2, mode="sideways")
    with pytest.raises(ValueError, match="n_classes"):
        ClassifierConfig(n_classes=1)


def test_lightning_module_step():
    module = ClassifierModule(tiny("hyena"), ClassifierConfig(n_classes=4, mode="rc"), {"lr": 1e-3},
                              rc_map=RC_MAP.tolist())
    logits = module(random_ids(2, 11))
    assert logits.shape == (2, 4) and logits.dtype == torch.float32
    assert module.hparams["rc_map"] == RC_MAP.tolist()


def test_fit_clips_with_a_fused_optimizer(monkeypatch: pytest.MonkeyPatch):
    """Lightning refuses to clip for a fused AdamW (what CUDA runs get); the module clips itself and logs
    the norm. Forced fused here on CPU, where it would otherwise be off."""
    import lightning as L

    real_adamw = torch.optim.AdamW
    built = []

    def fused_adamw(*args, **kwargs):
        built.append(real_adamw(*args, **{**kwargs, "fused": True}))
        return built[-1]

    monkeypatch.setattr(torch.optim, "AdamW", fused_adamw)
    module = ClassifierModule(tiny("hyena"), ClassifierConfig(n_classes=4, mode="causal"), {"lr": 1e-3})
    data = [{"input_ids": random_ids(2, 16, seed=i), "labels": torch.tensor([i % 4, (i + 1) % 4])} for i in range(2)]
    trainer = L.Trainer(max_steps=2, gradient_clip_val=1e-3, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert built and built[0].defaults["fused"]
    assert float(trainer.callback_metrics["train/grad_norm"]) > 1e-3  # logged before clipping, so above it
