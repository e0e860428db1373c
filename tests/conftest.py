import os

# The build machines cannot reach the Hugging Face hub; fail fast instead of retrying downloads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --- qaft-train pipeline helpers (tests/test_train.py, tests/test_ddp.py) -------------------------------
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def tiny_run_overrides(runs_root: Path, steps: int = 4) -> list[str]:
    """A seconds-long run of the whole pipeline on the random tiny LLaMA and a slice of Austen."""
    return [
        "model=tiny-llama", f"runs_root={runs_root}", f"trainer.max_steps={steps}", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "data.datamodule.seq_len=32", "data.datamodule.batch_size=2",
        "data.datamodule.max_train_tokens=2048", "data.datamodule.max_eval_tokens=256", "eval.seq_len=32",
        "eval.max_tokens=256", "eval.baselines=false", "save_model=false", "optim.warmup_steps=1",
    ]


def run_qaft_train(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m qaft.train ARGS`` in a fresh process (what a user's shell does)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "qaft.train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    return tiny_run_overrides(tmp_path / "runs")
