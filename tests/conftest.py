"""Shared fixtures. GPU tests are marked ``gpu`` and skip with a reason where CUDA is absent."""

from __future__ import annotations

import pytest

GiB = 2**30
GB = 10**9


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
