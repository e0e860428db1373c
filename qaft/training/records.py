"""The run record as training writes it: ``config.yaml`` at the start, a row of ``metrics.jsonl`` per optimizer step,
``record.json`` at the end, whatever happens after the config is valid (file names, statuses and the reading rules:
:mod:`qaft.run_folder`; which failure gives which status and exit code: :mod:`qaft.training.outcomes`).

``ok`` (0) means trained exactly as configured, to ``max_steps``, every loss, gradient, trained tensor and final
metric finite, on the data the config names; ``failed`` (1), ``diverged`` (3: a non-finite loss, gradient, trained
tensor or final metric; the last good checkpoint stays), ``interrupted`` (128 + signal number: SIGTERM / SIGINT,
checkpointed at a step boundary where it arrived during training, resumable).

Every file is strict JSON, written to a temporary file beside its target and renamed into place: a kill
leaves the previous version or the new one, never half of one. Non-finite numbers are written as ``null``
and listed under ``"non_finite"`` with what they were.
"""
from __future__ import annotations

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

from qaft.files import finite_json
from qaft.run_folder import RunFolder, Status
from qaft.training.spec import RunSpec


class Diverged(RuntimeError):
    """A non-finite loss, gradient, trained tensor or final metric: the run must not be recorded ``ok``."""


class RunInterrupted(Exception):
    """SIGTERM or SIGINT: the run stops (checkpointed where possible) and can be resumed."""

    def __init__(self, signum: int, step: int | None = None) -> None:
        self.signum, self.step = int(signum), step
        where = "" if step is None else f" at step {step}"
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}{where}")


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class MetricsRecorder(pl.Callback):
    """Appends the step's logged metrics to ``metrics.jsonl``.

    A callback rather than a Lightning logger because loggers are optional, and every run must leave its
    per-step metrics.
    """

    def __init__(self, run_dir: Path) -> None:
        self.folder = RunFolder(run_dir)
        self.final: Status | None = None

    def _write(self, trainer: pl.Trainer, prefixes: tuple[str, ...]) -> None:
        if not trainer.is_global_zero:
            return
        row: dict[str, Any] = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(prefixes) and (number := _number(value)) is not None:
                row[key] = number
        self.folder.append_metrics(row)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._write(trainer, ("train/", "lr/"))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, ("val/",))


def final_training_metrics(run_dir: Path, step: int) -> dict[str, float]:
    """``final_train_loss`` and the other ``final_<train|val>_*`` metrics: the values logged at ``step``, read from
    ``metrics.jsonl``, so that a rerun with nothing left to train (killed during evaluation) records them too."""
    final: dict[str, float] = {}
    for row in RunFolder(run_dir).read_metrics():
        if row["step"] == step:
            final |= {"final_" + k.replace("/", "_"): v for k, v in row.items() if k.startswith(("train/", "val/"))}
    return final


def training_cost(run_dir: Path) -> dict[str, Any]:
    """What training cost, from ``metrics.jsonl``: median seconds per step (the first step excluded: it
    warms up allocators and kernels), the run's peak memory, and the largest trainable-parameter count
    over its phases (per phase as well, where a method has several, e.g. DL-QAT's s, b then m, A, B)."""
    rows = [r for r in RunFolder(run_dir).read_metrics() if r.get("train/step_s") is not None]
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
        self.folder = RunFolder(run_dir)
        self.final: Status | None = None
        self.preset = preset or spec.method.name
        self.started = time.time()
        # Seconds of this process's stages; a resumed run's pipeline adds ``resumed_at_step`` (its checkpoint's step).
        self.timings: dict[str, float] = {}
        self._mark = time.perf_counter()
        # Called with the record just written, whatever the status (a tracker's copy: qaft.training.tracking).
        self.mirrors: list[Callable[[dict[str, Any]], None]] = []

    @rank_zero_only
    def write_config(self) -> None:
        self.folder.write_config(OmegaConf.to_yaml(self.cfg, resolve=True))

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
            "seed": self.spec.seed,
            "model": self.spec.model,
            "data": self.spec.data_name,
            "method_config": method.to_dict(),
            "steps": self.spec.max_steps,
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
    def finish(self, status: Status, metrics: dict[str, Any] | None = None,
               error: BaseException | None = None, extra: dict[str, Any] | None = None) -> Path:
        """Write ``record.json`` with ``status`` (and the error, with its traceback where it is a bug) and the
        top-level fields ``extra`` (``item_scores``); once it said ``ok``, the record is final (a signal that
        arrives while the final table prints changes nothing)."""
        if self.final == Status.OK:
            return self.folder.record_path
        self.timings["total_s"] = round(time.time() - self.started, 3)
        non_finite: dict[str, str] = {}
        metrics = finite_json(metrics or {}, "metrics", non_finite)
        record = {"status": status.value, **self._summary(), "metrics": metrics,
                  "timings": self.timings, "environment": self._environment(),
                  "run_dir": self.run_dir.name,  # relative to the runs root, as a tracker's copy has it: folders move
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
        if non_finite:
            record["non_finite"] = non_finite
        if error is not None:
            record["error"] = f"{type(error).__name__}: {error}"
            if status == Status.FAILED:
                record["traceback"] = "".join(traceback.format_exception(error))[-4000:]
        path = self.folder.write_record(record)
        self.final = status
        for mirror in self.mirrors:
            try:
                mirror(record)
            except Exception as err:  # noqa: BLE001 - a tracker that fails must not hide the run's own outcome
                print(f"qaft-train: warning: the run's record ({path}) is written, but its copy in the tracker failed: "
                      f"{type(err).__name__}: {err}", file=sys.stderr)
        return path
