"""The dispatch point: defaults per device, forcing by context and environment, strict errors."""

from __future__ import annotations

import pytest
import torch

from kernels.dispatch import choose_backend, forced_backend

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def test_defaults_by_device():
    assert choose_backend("op", ("reference", "chunked", "triton"), CPU) == "chunked"
    assert choose_backend("op", ("reference", "chunked", "triton"), CUDA) == "triton"
    assert choose_backend("op", ("reference",), CUDA) == "reference"
    assert choose_backend("op", ("reference", "chunked"), CUDA) == "chunked"


def test_forcing_all_ops_falls_back_to_a_simpler_form():
    with forced_backend("chunked"):
        assert choose_backend("op", ("reference",), CPU) == "reference"
        assert choose_backend("op", ("reference", "chunked"), CPU) == "chunked"
    with forced_backend("reference"):
        assert choose_backend("op", ("reference", "chunked", "triton"), CUDA) == "reference"


def test_forcing_one_op_is_strict(monkeypatch):
    with forced_backend("chunked", op="op"):
        with pytest.raises(ValueError, match="has no 'chunked' backend"):
            choose_backend("op", ("reference",), CPU)
        assert choose_backend("other", ("reference", "chunked"), CPU) == "chunked"
    monkeypatch.setenv("SSM_SUITE_BACKEND_OP", "reference")
    assert choose_backend("op", ("reference", "chunked"), CPU) == "reference"


def test_environment_and_bad_names(monkeypatch):
    monkeypatch.setenv("SSM_SUITE_BACKEND", "reference")
    assert choose_backend("op", ("reference", "chunked"), CPU) == "reference"
    monkeypatch.setenv("SSM_SUITE_BACKEND", "fast")
    with pytest.raises(ValueError, match="choose one of"):
        choose_backend("op", ("reference", "chunked"), CPU)
    with pytest.raises(ValueError, match="unknown backend"):
        with forced_backend("fast"):
            pass


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with forced_backend("triton", op="op"):
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            choose_backend("op", ("reference", "triton"), CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with forced_backend("triton", op="op"):
        assert choose_backend("op", ("reference", "triton"), CPU) == "triton"
