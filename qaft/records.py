"""The run record: what every run leaves in its folder, whatever happens after its config is valid.

* ``config.yaml``: the resolved config (reruns and reports read this, not the command line);
* ``metrics.jsonl``: one JSON object per optimizer step (loss, lr per role, tokens/s, peak memory, ...);
* ``record.json``: status ``ok`` or ``failed``, method, bits, group size, seed, model, data, final metrics
  and timings. A report reads only ``ok`` records; a config that fails validation writes none of these.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

import qaft
from qaft.config_schema import RunSpec

CONFIG_FILE, METRICS_FILE, RECORD_FILE = "config.yaml", "metrics.jsonl", "record.json"


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
            f.write(json.dumps(row) + "\n")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._write(trainer, ("train/", "lr/"))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, ("val/",))


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop rows after ``step``: a killed run logged steps its last checkpoint does not hold."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(row + "\n" for row in rows))


def training_cost(run_dir: Path) -> dict[str, Any]:
    """What training cost, from ``metrics.jsonl``: median seconds per step (the first step excluded: it
    warms up allocators and kernels), the run's peak memory, and the largest trainable-parameter count
    over its phases (per phase as well, where a method has several, e.g. DL-QAT's s, b then m, A, B)."""
    path = Path(run_dir) / METRICS_FILE
    rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
    rows = [r for r in rows if "train/step_s" in r]
    if not rows:
        return {}
    timed = rows[1:] or rows
    phases = list(dict.fromkeys(int(r["train/trainable_params"]) for r in rows))  # in the order they ran
    return {"step_s": statistics.median(r["train/step_s"] for r in timed),
            "tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in timed),
            "peak_memory_mb": max(r["train/peak_memory_mb"] for r in rows),
            "trainable_params": float(max(phases)), "trainable_params_by_phase": phases}


def last_step(run_dir: Path) -> int | None:
    """The last optimizer step in ``metrics.jsonl`` (None if nothing was logged)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line]
    return max(steps) if steps else None


class RunRecord:
    """Writes a run folder's ``config.yaml`` now and its ``record.json`` when the run ends (rank 0 only)."""

    def __init__(self, run_dir: Path, cfg: DictConfig, spec: RunSpec) -> None:
        self.run_dir, self.cfg, self.spec = Path(run_dir), cfg, spec
        self.started = time.time()
        self.timings: dict[str, float] = {}
        self._mark = time.perf_counter()

    @rank_zero_only
    def write_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.cfg, self.run_dir / CONFIG_FILE, resolve=True)

    def lap(self, name: str) -> None:
        """Record the seconds since the previous lap under ``timings[name + '_s']``."""
        now = time.perf_counter()
        self.timings[f"{name}_s"] = round(now - self._mark, 3)
        self._mark = now

    def _summary(self) -> dict[str, Any]:
        method = self.spec.method
        return {
            "method": method.name,
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
        }

    def _environment(self) -> dict[str, Any]:
        return {"qaft": qaft.__version__, "torch": torch.__version__, "lightning": pl.__version__,
                "python": platform.python_version(), "cuda": torch.cuda.is_available()}

    @rank_zero_only
    def finish(self, status: str, metrics: dict[str, Any] | None = None, error: BaseException | None = None) -> Path:
        """Write ``record.json``; ``status`` is ``ok`` or ``failed`` (with the error and its traceback)."""
        self.timings["total_s"] = round(time.time() - self.started, 3)
        record = {"status": status, **self._summary(), "metrics": metrics or {}, "timings": self.timings,
                  "environment": self._environment(), "run_dir": str(self.run_dir),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if error is not None:
            record["error"] = f"{type(error).__name__}: {error}"
            record["traceback"] = "".join(traceback.format_exception(error))[-4000:]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / RECORD_FILE
        path.write_text(json.dumps(record, indent=2) + "\n")
        return path


def read_record(run_dir: Path) -> dict[str, Any]:
    """The ``record.json`` of a run folder."""
    return json.loads((Path(run_dir) / RECORD_FILE).read_text())
