"""Suite-wide settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Every test model is tiny: one torch thread is fastest, and on a shared, loaded CPU two
    threads spin (often 10x slower). Subprocesses (accelerate launch) set their own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
