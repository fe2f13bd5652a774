"""The DNA commands end to end on small synthetic genomes: pretrain -> eval -> finetune (species from a
pretrained export with the RC-equivariant head, coding from scratch), exact resume, classifier
save / load, and the errors users meet first
(tokenizer / checkpoint mismatch, config typos). One test reads the real maffilter-examples alignment
and skips when the package is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir

from core.cli import CONFIG_ROOT
from domains.dna.evaluate import evaluate
from domains.dna.finetune import finetune
from domains.dna.pretrain import pretrain
from domains.dna.tokenizer import TokenizerMismatchError
from tests.domains.dna.conftest import write_maf

FAST = ["experiment=smoke", "model=transformer++-dna-cpu", "+model.overrides.d_model=32", "seq_len=64",
        "trainer.log_every_n_steps=1", "trainer.max_steps=4", "trainer.val_check_interval=2"]


def dna_config(command: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_ROOT / "dna"), version_base="1.3"):
        return compose(command, overrides=overrides)


def data_overrides(path: Path, tmp: Path) -> list[str]:
    return [f"data.path={path}", "data.example=null", "data.segment_bases=1000", "data.val_fraction=0.2",
            "data.test_fraction=0.2", f"data.cache_dir={tmp / 'cache'}", "data.species=[Hsap,Ptro,Ggor]"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("pretrain")
    maf = tmp / "apes.maf"
    write_maf(maf, n_blocks=40)
    cfg = dna_config("pretrain", [*FAST, *data_overrides(maf, tmp), f"run.dir={tmp / 'run'}"])
    result = pretrain(cfg)
    assert result["steps"] == 4
    assert 0.5 < result["test_bits_per_base"] < 4 and result["test_tokens"] > 0
    return tmp / "run", maf


def test_pretrain_writes_an_export_with_tokenizer_and_data(pretrained):
    run, _ = pretrained
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (run / "export" / name).is_file()
    meta = json.loads((run / "export" / "config.json").read_text())
    assert meta["domain"] == "dna" and meta["vocab_size"] == 10
    assert meta["extra"]["data"]["tracks"] == ["Hsap"] and meta["extra"]["tokenizer"]["k"] == 1
    assert "${" not in (run / "config.yaml").read_text()


def test_pretrain_evaluates_on_the_training_device(tmp_path: Path, monkeypatch):
    """Lightning's teardown moves the module to the CPU at the end of fit; the final val / test evaluation
    must run on the trainer's device, not on ``module.device`` (on a GPU that was minutes on the CPU).
    On a CPU-only machine the two are told apart by giving the trainer the device ``cpu:0``."""
    import torch

    import domains.dna.pretrain as pretrain_module

    original = pretrain_module.build_trainer

    def build_trainer(trainer_cfg, run_dir, extra_callbacks=None):
        trainer = original(trainer_cfg, run_dir, extra_callbacks)
        trainer.strategy._root_device = torch.device("cpu", 0)
        return trainer

    seen = []

    def mean_token_loss(model, loader, device):
        seen.append(torch.device(device))
        return 1.0, 1

    monkeypatch.setattr(pretrain_module, "build_trainer", build_trainer)
    monkeypatch.setattr(pretrain_module, "mean_token_loss", mean_token_loss)
    maf = tmp_path / "apes.maf"
    write_maf(maf, n_blocks=40)
    pretrain(dna_config("pretrain", [*FAST, "trainer.max_steps=1", *data_overrides(maf, tmp_path),
                                     f"run.dir={tmp_path / 'run'}"]))
    assert seen == [torch.device("cpu", 0)] * 2  # val and test


def test_eval_and_context_curve(pretrained):
    run, _ = pretrained
    scores = evaluate(dna_config("eval", [f"checkpoint={run}", "max_windows=4", "contexts=[4,16,48]",
                                          "score_len=8", "batch_size=2"]))
    assert scores["tokens"] > 0 and scores["bits_per_base"] > 0
    assert sorted(scores["context"]) == [4, 16, 48]
    assert all(v["ppl"] > 1 for v in scores["context"].values())
    with pytest.raises(TokenizerMismatchError, match="tokenizer.k=1 .*tokenizer.k=3"):
        evaluate(dna_config("eval", [f"checkpoint={run}", "tokenizer.k=3"]))
    with pytest.raises(FileNotFoundError, match="no export found"):
        evaluate(dna_config("eval", [f"checkpoint={run / 'nothing'}"]))


def test_finetune_species_from_pretrained_rc(pretrained, tmp_path: Path):
    run, maf = pretrained
    cfg = dna_config("finetune", [*FAST, "task=species", "task.window=128", f"pretrained={run}", "head.mode=rc",
                                  *data_overrides(maf, tmp_path),
                                  f"run.dir={tmp_path / 'ft'}"])
    result = finetune(cfg)
    assert result["classes"] == ["Hsap", "Ptro", "Ggor"] and result["test_windows"] == 12
    assert 0.0 <= result["test_acc"] <= 1.0 and result["steps"] == 4
    saved = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert saved["test_acc"] == result["test_acc"]
    assert (tmp_path / "ft" / "classifier" / "model.safetensors").is_file()


def test_classifier_save_and_load_with_shared_tensors(tmp_path: Path):
    import torch

    from core.classification import ClassifierConfig, ClassifierModule
    from core.dna_presets import get_dna_preset
    from domains.dna.finetune import load_classifier, save_classifier
    from domains.dna.tokenizer import DNATokenizer

    config = get_dna_preset("hyena-dna-cpu", d_model=16, hyena={"max_seqlen": 32, "filter_order": 8},
                            mlp={"hidden_size": 32})  # Hyena's sine layers share one frequency tensor
    module = ClassifierModule(config, ClassifierConfig(n_classes=3, mode="rc"), {},
                              rc_map=DNATokenizer(1).rc_map().tolist())
    save_classifier(tmp_path / "clf", module, {"task": {"name": "species"}})
    loaded = load_classifier(tmp_path / "clf")
    x = torch.randint(5, 10, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, module.model.eval()(x).logits)


def test_finetune_tokenizer_mismatch(pretrained, tmp_path: Path):
    run, maf = pretrained
    cfg = dna_config("finetune", [*FAST, "task=species", "task.window=128", f"pretrained={run}", "tokenizer.k=2",
                                  *data_overrides(maf, tmp_path),
                                  f"run.dir={tmp_path / 'ft'}"])
    with pytest.raises(TokenizerMismatchError, match="trained with tokenizer.k=1"):
        finetune(cfg)


def test_finetune_coding_from_scratch(fasta_genome, tmp_path: Path):
    path, _ = fasta_genome
    gff = tmp_path / "genes.gff3"
    lines = ["##gff-version 3"]
    for chrom, length in (("chr1", 6000), ("chr2", 4000)):
        for start in range(0, length - 400, 800):  # 400 coding, 400 intergenic, alternating
            lines.append(f"{chrom}\tsyn\tCDS\t{start + 1}\t{start + 400}\t.\t+\t0\tID=c{start}")
    gff.write_text("\n".join(lines) + "\n")
    cfg = dna_config("finetune", [*FAST, "task=coding", "task.window=64", "head.mode=bidirectional",
                                  *data_overrides(path, tmp_path), f"data.gff={gff}", f"run.dir={tmp_path / 'ft'}"])
    result = finetune(cfg)
    assert result["classes"] == ["intergenic", "coding"] and result["test_windows"] == 8


@pytest.mark.skipif(not Path("/usr/share/doc/maffilter/examples/Gorilla").is_dir(),
                    reason="needs Debian's maffilter-examples (apt-get install maffilter-examples)")
def test_real_apes_alignment(tmp_path: Path):
    from domains.dna.data import DNAData

    data = DNAData(dict(example="apes", species=["Hsap", "Ptro", "Ggor", "Ppyg"], tracks=["Hsap"],
                        cache_dir=str(tmp_path / "cache")), verbose=False)
    assert data.genome.track_names == ["Hsap", "Ptro", "Ggor", "Ppyg"]
    assert all(data.genome.track(t).length > 20_000_000 for t in data.genome.track_names)
    test_groups = {iv.group for iv in data.split("test")}
    assert test_groups.isdisjoint({iv.group for iv in data.split("train")})
    assert test_groups.isdisjoint({iv.group for iv in data.split("val")})


@pytest.mark.parametrize("args,message", [
    (["finetune", "task=speciez"], "Could not find 'task/speciez'"),
    (["pretrain", "trainer.max_stepz=3"], "max_stepz"),
])
def test_config_typos_fail_before_any_work(args: list[str], message: str, tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "domains.dna", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ,
                                                       "PYTHONPATH": str(CONFIG_ROOT.parent)})
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert not (tmp_path / "data_cache").exists() and not (tmp_path / "runs").exists()


class RecordLosses(L.Callback):
    """Keeps each step's training loss; optionally stops the run by raising after ``stop_at`` steps."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            raise RuntimeError("simulated interruption")


def test_pretrain_resume_reproduces_the_uninterrupted_run(fasta_genome, tmp_path: Path, monkeypatch):
    import domains.dna.pretrain as pretrain_module

    path, _ = fasta_genome
    build = pretrain_module.build_trainer

    def run(run_dir: Path, recorder, *extra: str) -> None:
        monkeypatch.setattr(pretrain_module, "build_trainer",
                            lambda cfg, d: build(cfg, d, extra_callbacks=[recorder]))
        cfg = dna_config("pretrain", [*FAST, *data_overrides(path, tmp_path), "data.tracks=null",
                                      f"run.dir={run_dir}", *extra])
        pretrain_module.pretrain(cfg)

    whole = RecordLosses()
    run(tmp_path / "a", whole)
    interrupted = RecordLosses(stop_at=3)  # the last checkpoint is step 2's
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run(tmp_path / "b", interrupted)
    resumed = RecordLosses()
    run(tmp_path / "b", resumed, "trainer.resume=last")
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(whole.losses[step], rel=1e-6, abs=1e-7)
