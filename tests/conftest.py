import os
import sys

import pytest
import torch

# Tests import the project's top-level modules (optimizers, train_gpt, data/, records/) by path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `cuda` cleanly on machines without a GPU (CI has none)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
