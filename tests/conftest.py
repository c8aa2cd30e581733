"""Shared test helpers: markers, backends under test, tie-free data, per-dtype tolerances."""
import os

import pytest
import torch

import sparsity_ext
from sparsity_ext import _backend

HAS_CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
requires_triton = pytest.mark.skipif(not HAS_TRITON or not (HAS_CUDA or TRITON_INTERPRET),
                                     reason="needs triton and a GPU, or TRITON_INTERPRET=1 on the CPU")

# Float comparisons of weights/outputs (masks and metadata are always compared exactly).
TOLERANCES = {
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}


def tie_free(shape, dtype=torch.float32, device="cpu", seed=0):
    """Random data whose |values| are all distinct: a seeded permutation of distinct magnitudes with
    random signs, so every ranking (elements and, almost surely, block means) is unambiguous."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    magnitudes = (torch.randperm(n, generator=g).to(torch.float64) + 1) / max(n, 1)
    noise = torch.rand(n, generator=g, dtype=torch.float64) * (0.5 / max(n, 1))
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    return ((magnitudes + noise) * signs).reshape(shape).to(dtype=dtype, device=device)


def backend_available(name: str, device: str, op: str = "block_norm_mask", dtype=torch.float32) -> bool:
    """Whether backend `name` has a usable `op` for `device` tensors of `dtype` on this machine."""
    try:
        with sparsity_ext.use_backend(name):
            _backend.resolve(op, torch.device(device), dtype)
        return True
    except RuntimeError:
        return False


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(0)
