"""Test session setup: offline Hugging Face hub, and the shared fixtures (helpers live in tests/helpers.py)."""
import os
from pathlib import Path

# The build machines cannot reach the Hugging Face hub; fail fast instead of retrying downloads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from helpers import tiny_run_overrides  # noqa: E402


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    return tiny_run_overrides(tmp_path / "runs")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (more only add synchronisation, badly so on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
