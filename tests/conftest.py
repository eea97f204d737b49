"""Shared test set-up: offline Hugging Face hubs, and a fixture that runs torch on one thread."""

from __future__ import annotations

import os
from collections.abc import Iterator

# Set before any test module imports transformers: no test may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module's tests with one torch thread (tiny models are slower with more), then restore."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
