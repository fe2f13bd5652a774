"""Test-wide settings: the Triton interpreter on CPU, one intra-op thread (tests use tiny tensors, where threading only adds
overhead, and CI's two cores are often shared), and fresh seeds for every test."""

import os

# Triton kernels run on CPU through the interpreter; it must be chosen before triton is first
# imported (anything may import it), so it is set here, before torch. A GPU run of the kernel
# tests sets TRITON_INTERPRET=0 explicitly.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("SSM_SUITE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
