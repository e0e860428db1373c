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
