"""Shared test helpers: the tiny model and token batches, and ``qaft-train`` in a real process.

``tiny_llama`` is qaft's own ``build_tiny_llama`` with a 256-token vocabulary (fast method tests); the process
helpers run ``python -m qaft.training.cli`` with ``tests/`` on ``PYTHONPATH`` (so ``run_probes`` callbacks can
be plugged in through the config) and send real signals to it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qaft.models import build_tiny_llama

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
VOCAB = 256
# Parametrise a test over these to run it on CPU and, where there is a GPU, on CUDA (tests/conftest.py skips it
# otherwise; experiments/bench/device_check.py runs the `cuda` ones).
DEVICES = (pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda))


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random two-layer LLaMA (widths 64 / 128, divisible by groups of 32 and 64), in eval mode."""
    return build_tiny_llama(vocab_size=VOCAB, seed=seed, dtype=dtype).eval()


def token_batch(seed: int = 1, batch: int = 2, length: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def train_steps(model: torch.nn.Module, ids: torch.Tensor, steps: int, lr: float = 1e-2,
                autocast: torch.dtype | None = None) -> torch.nn.Module:
    """``steps`` AdamW steps of a method's model on ``ids`` (its trainable groups; each step in the phase
    ``qaft.set_training_step`` gives it), under autocast to ``autocast`` if given; returned in eval mode."""
    import contextlib

    import qaft

    params = [p for group in qaft.parameter_groups(model).values() for p in group]
    opt = torch.optim.AdamW(params, lr=lr) if params else None
    model.train()
    for step in range(steps):
        qaft.set_training_step(model, step)
        cast = contextlib.nullcontext() if autocast is None else torch.autocast(ids.device.type, dtype=autocast)
        with cast:
            loss = model(ids, labels=ids).loss
        if opt is not None:
            loss.backward()
            opt.step()
            opt.zero_grad()
    return model.eval()


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}


# The last line of a script run by :func:`plain_python`: the export must stand on its own, without qaft.
ASSERT_NO_QAFT = 'assert not [m for m in sys.modules if m == "qaft" or m.startswith("qaft.")], "qaft was imported"\n'


def plain_python(*args: str, timeout: float = 300, cwd: str | Path = "/") -> subprocess.CompletedProcess:
    """``python *args`` in a fresh interpreter without qaft on the path (what a user of an export has)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1",
                                                                         "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=str(cwd))


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
    return subprocess.run([sys.executable, "-m", "qaft.training.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env())


def start_qaft_train(args: list[str]) -> subprocess.Popen:
    """``python -m qaft.training.cli ARGS`` started in the background (stdout/stderr captured as text)."""
    return subprocess.Popen([sys.executable, "-m", "qaft.training.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until ``path`` exists; fails if ``proc`` ends first."""
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


def fake_run_folder(run_dir: Path, merged: torch.nn.Module, float_model: torch.nn.Module | None = None) -> None:
    """A run folder as qaft-train leaves it (merged model, record naming it relative to the folder)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model: {name_or_path: tiny-llama}\nmethod: {bits: 4, group_size: 32}\n")
    from qaft.deploy.merged import save_merged

    save_merged(merged if float_model is None else float_model, run_dir / "merged_model")
    (run_dir / "record.json").write_text(json.dumps({"status": "ok", "model": "tiny-llama", "bits": 4, "group_size": 32,
                                                     "metrics": {"merged_model_path": "merged_model"}}))


def move_trainables(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every trainable tensor moved by a random step of ~30% of its mean magnitude, as training would (in place)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(0.3 * param.abs().mean().clamp(min=1e-3) * torch.randn(param.shape, generator=generator))
    return model
