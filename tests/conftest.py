"""Test-wide settings: one intra-op thread (tests use tiny tensors, where threading only adds
overhead, and CI's two cores are often shared), and fresh seeds for every test."""

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("SSM_SUITE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
