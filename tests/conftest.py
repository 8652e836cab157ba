"""Shared test set-up: small, deterministic, CPU by default; GPU and Detectron2 tests skip cleanly."""
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Under pytest-xdist every worker already keeps a core busy: more threads per worker only oversubscribe
# (a training step ran ~40x slower with 2 threads per worker on a 2-core machine).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    try:
        import detectron2  # noqa: F401

        has_d2 = True
    except ImportError:
        has_d2 = False
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "detectron2" in item.keywords and not has_d2:
            item.add_marker(pytest.mark.skip(reason="needs Detectron2 importable"))


@pytest.fixture
def train_net():
    """tools/train_net.py as a module; the root-logger handlers its runs install are removed afterwards."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import train_net

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield train_net
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
