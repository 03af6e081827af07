"""Suite-wide settings of the fork's tests (markers are declared in pyproject.toml)."""

import os
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parent

# Every process of the suite shares one JIT-extension cache, prebuilt by `make install` (DeepSpeed's CPU comm op).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def pytest_collection_modifyitems(config, items):
    if _cuda_devices() >= 2:
        return
    skip_gpu = pytest.mark.skip(reason="needs 2+ CUDA devices (NCCL); the CPU/gloo variant of the test runs here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
