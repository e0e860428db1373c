"""The run record: what every run leaves in its folder, whatever happens after its config is valid.

* ``config.yaml``: the resolved config (reruns and reports read this, not the command line);
* ``metrics.jsonl``: one JSON object per optimizer step (loss, lr per role, tokens/s, peak memory, ...);
* ``record.json``: the status, method, bits, group size, seed, model, data, the config's identity digest,
  final metrics and timings. A report reads only ``ok`` records; a config that fails validation writes none.

Statuses (and the exit code of ``qaft-train``):

* ``ok`` (0): trained exactly as configured, to ``max_steps``, every loss, gradient, trained tensor and final
  metric finite, on the data the config names;
* ``failed`` (1): an error; ``diverged`` (3): a non-finite loss, gradient, trained tensor or final metric,
  the run stopped before keeping it (the last good checkpoint stays); ``interrupted`` (128 + signal number):
  SIGTERM / SIGINT, checkpointed at a step boundary where it arrived during training, resumable.

Every file is strict JSON, written to a temporary file beside its target and renamed into place: a kill
leaves the previous version or the new one, never half of one. Non-finite numbers are written as ``null``
and listed under ``"non_finite"`` with what they were.
"""
from __future__ import annotations

import json
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from qaft.files import atomic_write, dumps, finite_json, write_json
from qaft.training.config import RunSpec

CONFIG_FILE, METRICS_FILE, RECORD_FILE = "config.yaml", "metrics.jsonl", "record.json"
OK, FAILED, DIVERGED, INTERRUPTED = "ok", "failed", "diverged", "interrupted"
EXIT_CODES = {OK: 0, FAILED: 1, DIVERGED: 3}


class Diverged(RuntimeError):
    """A non-finite loss, gradient, trained tensor or final metric: the run must not be recorded ``ok``."""


class RunInterrupted(Exception):
    """SIGTERM or SIGINT: the run stops (checkpointed where possible) and can be resumed."""

    def __init__(self, signum: int, step: int | None = None) -> None:
        self.signum, self.step = int(signum), step
        where = "" if step is None else f" at step {step}"
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}{where}")


def exit_code(status: str, error: BaseException | None = None) -> int:
    """The process exit status of a run that ended with ``status``."""
    if isinstance(error, RunInterrupted):
        return 128 + error.signum
    return EXIT_CODES.get(status, 1)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class MetricsRecorder(pl.Callback):
    """Appends the step's logged metrics to ``metrics.jsonl``.

    A callback rather than a Lightning logger because ``fast_dev_run`` swaps loggers for a dummy, and every
    run, a dev run too, must leave its per-step metrics.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / METRICS_FILE

    def _write(self, trainer: pl.Trainer, prefixes: tuple[str, ...]) -> None:
        if not trainer.is_global_zero:
            return
        row: dict[str, Any] = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(prefixes) and (number := _number(value)) is not None:
                row[key] = number
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(dumps(row) + "\n")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._write(trainer, ("train/", "lr/"))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, ("val/",))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (a last line cut short by a kill is dropped)."""
    path = Path(run_dir) / METRICS_FILE
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def trim_metrics(run_dir: Path, step: int) -> None:
    """Keep rows up to ``step``: a killed run logged steps its last checkpoint does not hold."""
    path = Path(run_dir) / METRICS_FILE
    if path.is_file():
        text = "".join(dumps(r) + "\n" for r in read_metrics(run_dir) if r["step"] <= step)
        atomic_write(path, lambda f: f.write(text.encode()))


def training_cost(run_dir: Path) -> dict[str, Any]:
    """What training cost, from ``metrics.jsonl``: median seconds per step (the first step excluded: it
    warms up allocators and kernels), the run's peak memory, and the largest trainable-parameter count
    over its phases (per phase as well, where a method has several, e.g. DL-QAT's s, b then m, A, B)."""
    rows = [r for r in read_metrics(run_dir) if r.get("train/step_s") is not None]
    if not rows:
        return {}
    timed = rows[1:] or rows
    phases = list(dict.fromkeys(int(r["train/trainable_params"]) for r in rows))  # in the order they ran
    return {"step_s": statistics.median(r["train/step_s"] for r in timed),
            "tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in timed),
            "peak_memory_mb": max(r["train/peak_memory_mb"] for r in rows),
            "trainable_params": float(max(phases)), "trainable_params_by_phase": phases}


class RunRecord:
    """Writes a run folder's ``config.yaml`` now and its ``record.json`` when the run ends (rank 0 only)."""

    def __init__(self, run_dir: Path, cfg: DictConfig, spec: RunSpec, identity: str, preset: str | None = None) -> None:
        """``preset``: the ``method`` config option (``loftq_int``, ``ptq_gptq``), when it is not the method's name."""
        self.run_dir, self.cfg, self.spec, self.identity = Path(run_dir), cfg, spec, identity
        self.preset = preset or spec.method.name
        self.started = time.time()
        self.timings: dict[str, float] = {}
        self._mark = time.perf_counter()
        # Called with the record just written, whatever the status (a tracker's copy: qaft.training.tracking).
        self.mirrors: list[Callable[[dict[str, Any]], None]] = []

    @rank_zero_only
    def write_config(self) -> None:
        text = OmegaConf.to_yaml(self.cfg, resolve=True)
        atomic_write(self.run_dir / CONFIG_FILE, lambda f: f.write(text.encode()))

    def lap(self, name: str) -> None:
        """Record the seconds since the previous lap under ``timings[name + '_s']``."""
        now = time.perf_counter()
        self.timings[f"{name}_s"] = round(now - self._mark, 3)
        self._mark = now

    def _summary(self) -> dict[str, Any]:
        method = self.spec.method
        return {
            "method": method.name,
            "preset": self.preset,
            "bits": self.spec.bits,
            "group_size": self.spec.group_size,
            "rank": getattr(method, "rank", None),
            "seed": int(self.cfg.seed),
            "model": str(self.cfg.model.name_or_path),
            "data": str(self.cfg.data.name),
            "method_config": method.to_dict(),
            "steps": int(self.cfg.trainer.max_steps),
            "experiment": self.cfg.get("experiment_name"),
            "scale": OmegaConf.select(self.cfg, "scale.name"),
            "identity": self.identity,
        }

    def described(self) -> dict[str, Any]:
        """What identifies and describes the run before it ends: the record's keys that are not results, the run
        folder's name and the resolved config (``config``); a tracker's config, so that its runs read back as
        records (:mod:`qaft.reporting.wandb_runs`)."""
        keep = [k for k in self.cfg.keys() if k != "hydra"]  # inside a Hydra app it is not there; composed, it is
        config = OmegaConf.to_container(OmegaConf.masked_copy(self.cfg, keep), resolve=True)
        return {**self._summary(), "run_dir": self.run_dir.name, "config": config}

    def _environment(self) -> dict[str, Any]:
        return {"qaft": version("qaft"), "torch": torch.__version__, "lightning": pl.__version__,
                "python": platform.python_version(), "cuda": torch.cuda.is_available()}

    @rank_zero_only
    def finish(self, status: str, metrics: dict[str, Any] | None = None, error: BaseException | None = None) -> Path:
        """Write ``record.json`` with ``status`` (and the error, with its traceback where it is a bug)."""
        self.timings["total_s"] = round(time.time() - self.started, 3)
        non_finite: dict[str, str] = {}
        record = {"status": status, **self._summary(), "metrics": finite_json(metrics or {}, "metrics", non_finite),
                  "timings": self.timings, "environment": self._environment(), "run_dir": str(self.run_dir),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if non_finite:
            record["non_finite"] = non_finite
        if error is not None:
            record["error"] = f"{type(error).__name__}: {error}"
            if status == FAILED:
                record["traceback"] = "".join(traceback.format_exception(error))[-4000:]
        path = write_json(self.run_dir / RECORD_FILE, record)
        for mirror in self.mirrors:
            try:
                mirror(record)
            except Exception as err:  # noqa: BLE001 - a tracker that fails must not hide the run's own outcome
                print(f"qaft-train: warning: the run's {RECORD_FILE} is written, but its copy in the tracker failed: "
                      f"{type(err).__name__}: {err}", file=sys.stderr)
        return path


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The ``record.json`` of a run folder, or None where there is none (or it cannot be read)."""
    path = Path(run_dir) / RECORD_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
