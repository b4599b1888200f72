"""CUDA-only tests (``pytest -m gpu``; run by `star-scale bench gpu`): skipped without a CUDA device."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        item.add_marker(skip)
