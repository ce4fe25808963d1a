"""Kernel tests run the Triton kernels on CPU under Triton's interpreter when there is no GPU.

Triton reads TRITON_INTERPRET when a kernel is defined (when mmtrain.kernels.flash_attention & co.
are first imported), so it is set here, before any test module imports them. On a machine with a
GPU the kernels are compiled for it instead, and the bf16 tests run too.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mmtrain.kernels as kernels  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def triton_backend():
    """Force the Triton backend for one test, then restore automatic selection."""
    kernels.set_backend("triton")
    yield
    kernels.set_backend("auto")


@pytest.fixture
def reference_backend():
    kernels.set_backend("reference")
    yield
    kernels.set_backend("auto")
