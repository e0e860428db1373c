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
    """``python -m qaft.training.cli ARGS`` in a fresh process (what a user's shell does)."""
    # tests/ on the path: the run_probes callbacks are plugged in through the config
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "qaft.training.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    return tiny_run_overrides(tmp_path / "runs")


def start_qaft_train(args: list[str]) -> subprocess.Popen:
    """``python -m qaft.training.cli ARGS`` started in the background (stdout/stderr captured as text)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "qaft.training.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until ``path`` exists; fails if ``proc`` ends first."""
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {path} appeared:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def signal_at_step(args: list[str], step: int, signum: int, marker: Path, pause: float = 600.0,
                   timeout: float = 300) -> subprocess.CompletedProcess:
    """Run qaft-train, send ``signum`` to it while it waits before optimizer step ``step + 1`` (``step`` steps
    done, see ``run_probes.PauseAt``), and wait for it to end."""
    probe = f"+callbacks.pause={{_target_: run_probes.PauseAt, step: {step}, marker: '{marker}', seconds: {pause}}}"
    proc = start_qaft_train([*args, probe])
    wait_for(marker, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
