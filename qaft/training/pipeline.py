"""A whole run from a validated config: train, evaluate, save the deployable model, write the record.

``qaft.training.app`` validates and calls :func:`run`; everything here assumes :func:`qaft.training.config.validate`
has passed, so an exception from here on is a run that did not finish, recorded with its status
(:mod:`qaft.training.records`): ``failed``, ``diverged`` or ``interrupted``. A run folder belongs to one process at a
time (:class:`qaft.run_folder.RunLock`); a finished ``ok`` run is not run again (``resume=never`` forces it).
"""
from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from qaft import progress
from qaft.data import NeedsModel
from qaft.data.stream import RunData
from qaft.deploy.merged import MERGED_DIGESTS
from qaft.evaluation.deployed import deployed_perplexity
from qaft.models import load_causal_lm, load_tokenizer
from qaft.run_folder import MERGED_MODEL, RunFolder, Status
from qaft.training.config import ConfigError, run_name, validate
from qaft.training.final_eval import check_finite, corpus_perplexity, evaluate, form_items, lm_eval, scored_on
from qaft.training.identity import config_digest, identity_config, unmatched_reads
from qaft.training.module import DivergenceGuard, ProgressLines, QaftModule, SafeCheckpointIO, TrainingStats
from qaft.training.outcomes import outcome
from qaft.training.progress_bar import terminal_bar
from qaft.training.records import MetricsRecorder, RunRecord, final_training_metrics, training_cost
from qaft.training.resume import ResumeRefused, resume_checkpoint
from qaft.training.run_control import SignalGuard, StopOnSignal
from qaft.training.run_dir import discard_run_dir
from qaft.training.spec import RunSpec
from qaft.training.tracking import track


def run_dir_of(cfg: DictConfig) -> Path:
    """The run folder: Hydra's output folder inside a Hydra app, else ``runs_root/<name>-<identity digest>``."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    name = run_name(cfg.method, cfg.model.name_or_path, cfg.data.name, cfg.seed)
    return Path(cfg.runs_root) / f"{name}-{config_digest(cfg)}"


def build_trainer(cfg: DictConfig, spec: RunSpec, run_dir: Path, guard: SignalGuard) -> pl.Trainer:
    """Lightning's Trainer from ``cfg.trainer`` plus qaft's record, safety, progress and checkpoint callbacks, and
    the config's own ``callbacks`` (``_target_`` nodes, e.g. a profiler or a test's probe).

    Lightning's progress bar is drawn only on a terminal: in a file (a SLURM log) its carriage returns make one
    unreadable line, so there :class:`ProgressLines` prints a line every ``progress.every_n_steps`` instead."""
    folder = RunFolder(run_dir)
    callbacks: list[pl.Callback] = [
        TrainingStats(),
        ProgressLines(spec.progress_every_n_steps),
        DivergenceGuard(spec.divergence_loss_vs_uniform),
        MetricsRecorder(run_dir),
        StopOnSignal(guard, folder.last_checkpoint),
        ModelCheckpoint(dirpath=folder.checkpoints, save_last=True, save_top_k=0,
                        every_n_train_steps=spec.checkpoint_every_n_steps, enable_version_counter=False),
    ]
    callbacks += [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    logger = instantiate(cfg.logger, save_dir=str(run_dir), name=run_dir.name) if cfg.logger.get("_target_") else False
    bar = bool(cfg.trainer.get("enable_progress_bar", True)) and sys.stdout.isatty()
    callbacks += terminal_bar() if bar else []  # a rate and an ETA on every step, however slow (progress_bar)
    return instantiate(cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(run_dir),
                       plugins=[SafeCheckpointIO()], enable_progress_bar=bar)


def _float_model(spec: RunSpec, accelerator: str) -> torch.nn.Module:
    """The run's model as loaded, before any method: what generates data-free training data (on the GPU if the
    run has one)."""
    model = load_causal_lm(spec.model, getattr(torch, spec.dtype))[0]
    on_gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    return model.to("cuda" if on_gpu else "cpu")


def _run_data(cfg: DictConfig, spec: RunSpec) -> RunData:
    """The run's data; a DataModule that generates its data from the float model gets a loader for it."""
    inner = instantiate(cfg.data.datamodule, tokenizer=load_tokenizer(spec.model))
    if isinstance(inner, NeedsModel):
        inner.use_model(functools.partial(_float_model, spec, str(cfg.trainer.get("accelerator", "auto"))),
                        {"name_or_path": spec.model, "dtype": spec.dtype})
    return RunData(inner, spec.seed)


def _evidence(spec: RunSpec, metrics: dict[str, Any], trains: bool) -> list[str]:
    """What is missing for the record to say ``ok``: every step trained, its final training metrics, a finite
    perplexity of the deployed model."""
    missing = []
    if trains and metrics.get("global_step") != spec.max_steps:
        missing.append(f"global_step={metrics.get('global_step')} is not trainer.max_steps={spec.max_steps}")
    if trains and "final_train_loss" not in metrics:
        missing.append("no final_train_loss")
    if deployed_perplexity(metrics) is None:
        missing.append("no perplexity of the deployed model")
    return missing


class _Attempt:
    """One attempt at a run, under the folder's lock: loads, trains, evaluates, saves, records. ``metrics`` holds
    what it has measured so far, which a record of a failure keeps."""

    def __init__(self, cfg: DictConfig, spec: RunSpec, folder: RunFolder, record: RunRecord, guard: SignalGuard,
                 ckpt: str | None) -> None:
        self.cfg, self.spec, self.folder, self.record, self.guard, self.ckpt = cfg, spec, folder, record, guard, ckpt
        self.metrics: dict[str, Any] = {}

    def _train(self, module: QaftModule, data: RunData, trainer: pl.Trainer) -> None:
        if not module.trains:
            return
        trainer.fit(module, datamodule=data, ckpt_path=self.ckpt, weights_only=True)
        if trainer.global_step != self.spec.max_steps:  # a run record must never claim steps that did not happen
            raise RuntimeError(f"training stopped at step {trainer.global_step} of {self.spec.max_steps}")
        # The optimizer (its state: 2x what trains) and the tensors it references would outlive the in-place merge.
        trainer.strategy.optimizers, trainer.strategy.lr_scheduler_configs = [], []
        final = rank_zero_only(final_training_metrics)(self.folder.path, trainer.global_step) or {}
        cost = rank_zero_only(training_cost)(self.folder.path) or {}
        self.metrics |= final | {"global_step": trainer.global_step, "cost": cost}

    def run(self) -> dict[str, Any] | None:
        spec = self.spec
        pl.seed_everything(spec.seed, workers=True, verbose=False)
        progress.say(f"run {self.folder.path.name}: loading model {spec.model} and data {spec.data_name}")
        # The data comes first: a method calibrated on training batches (GPTQ) needs them to be built.
        data = _run_data(self.cfg, spec)
        calibration = spec.method.calibration_options()
        calib = data.calibration_batches(calibration.calib_batches) if calibration is not None else None
        module = QaftModule(self.cfg, spec.method, calib, identity_config(self.cfg))
        targets = module.model.qaft_targets  # which linear layers the method quantizes, which it leaves float
        progress.say(targets.line())
        self.metrics["layers"] = targets.record()
        trainer = build_trainer(self.cfg, spec, self.folder.path, self.guard)
        track(trainer.logger, self.record)
        self.record.lap("load")
        self._train(module, data, trainer)
        self.record.lap("train")
        if not trainer.is_global_zero:
            return None
        return self._finish(module, data)

    def _finish(self, module: QaftModule, data: RunData) -> dict[str, Any]:
        spec, folder = self.spec, self.folder
        staged = folder.pending_merged_path if spec.save_model else None  # kept only if the run ends ok
        result, tokens, saved = evaluate(spec, module, data, staged)
        self.metrics |= result.metrics() | {"eval_tokens": tokens}
        items, aliases = form_items(result)  # the item scores behind each metric, under its record key
        reads = data.data_sha256
        if spec.eval.corpus is not None:
            corpus = corpus_perplexity(spec.eval.corpus, result.deployed, module.tokenizer, reads, spec.eval.autocast)
            self.metrics |= {key: scores.perplexity for key, scores in corpus.items()}
            items |= {f"metrics.{key}": scores.rows() for key, scores in corpus.items()}
        self.metrics["data_sha256"] = reads
        self.metrics["deployed"] = result.deployment
        if spec.eval.tasks:
            tasks = lm_eval(spec, result.deployed, module.tokenizer, result.deployment["form"])
            self.metrics["lm_eval"] = tasks.results
            items |= {f"metrics.lm_eval.{key}": rows for key, rows in tasks.items.items()}
        self.record.lap("eval")
        check_finite({k: v for k, v in self.metrics.items() if k.startswith("ppl_")})
        if missing := _evidence(spec, self.metrics, module.trains) + unmatched_reads(module.identity, reads):
            raise RuntimeError(f"the run cannot be recorded ok: {'; '.join(missing)}")
        if staged is not None:
            shutil.rmtree(folder.merged_path, ignore_errors=True)
            os.replace(staged, folder.merged_path)
            self.metrics |= {"merged_model_path": MERGED_MODEL, MERGED_DIGESTS: saved}  # relative: folders move
            self.record.lap("save")
        self.record.finish(Status.OK, self.metrics, extra=folder.store_item_scores(items, aliases))
        print(f"\n{result.table(spec.method.name)}\n{scored_on(spec, tokens)}")
        print(f"record: {folder.record_path}")
        return self.metrics


def _preset() -> str | None:
    """The ``method`` option Hydra composed (``loftq_int`` is LoftQ on the integer base), if any."""
    return HydraConfig.get().runtime.choices.get("method") if HydraConfig.initialized() else None


def _finished(folder: RunFolder, spec: RunSpec) -> dict[str, Any] | None:
    """The metrics of an ``ok`` record already in the folder (a rerun of a finished run does nothing)."""
    record = folder.read_record()
    if spec.resume == "never" or not record or record.get("status") != Status.OK:
        return None
    if spec.save_model and "merged_model_path" not in record["metrics"]:
        return None  # finished without a saved model, now asked for one: run it again
    print(f"qaft-train: {folder.path} already finished (status ok); resume=never runs it again")
    return record.get("metrics", {})


def run(cfg: DictConfig, spec: RunSpec | None = None) -> dict[str, Any] | None:
    """Run the job ``cfg`` describes; returns its final metrics (``None`` on ranks other than 0).

    An invalid config raises :class:`ConfigError` before anything is written; after that, a run that does not
    finish leaves its record (``failed``, ``diverged`` or ``interrupted``: :mod:`qaft.training.outcomes`) and
    re-raises.
    """
    spec = spec or validate(cfg)
    run_dir, identity = run_dir_of(cfg), identity_config(cfg)
    with progress.reporting(rank_zero_only.rank == 0, spec.progress_every_s):
        return _owned_run(cfg, spec, RunFolder(run_dir), identity)


def _owned_run(cfg: DictConfig, spec: RunSpec, folder: RunFolder, identity: dict[str, Any]) -> dict[str, Any] | None:
    """:func:`run` once the folder is known: under its lock, with its record."""
    lock = folder.lock().acquire() if rank_zero_only.rank == 0 else None
    try:
        rank_zero_only(folder.remove_debris)()  # under the lock: no writer of this folder is alive
        if rank_zero_only.rank == 0 and (done := _finished(folder, spec)) is not None:
            return done
        with SignalGuard() as guard:
            ckpt = resume_checkpoint(spec.resume, folder, identity)  # a refused checkpoint costs no model load
            record = RunRecord(folder.path, cfg, spec, config_digest(identity), _preset())
            if ckpt is not None:  # the timings then cover only this process: say so, or they undercount the run
                record.timings["resumed_at_step"] = ckpt.step
            record.write_config()
            attempt = _Attempt(cfg, spec, folder, record, guard, ckpt.path if ckpt else None)
            try:
                return attempt.run()
            except BaseException as err:  # KeyboardInterrupt too: the record must not look finished
                ended = outcome(err)
                shutil.rmtree(folder.pending_merged_path, ignore_errors=True)  # a model of a run that did not end ok
                if ended.status is not None:
                    record.finish(ended.status, attempt.metrics, error=ended.error)
                if ended.error is not err:
                    raise ended.error from None
                raise
    finally:
        if lock is not None:
            lock.release()


__all__ = ["ConfigError", "ResumeRefused", "build_trainer", "discard_run_dir", "run", "run_dir_of"]
