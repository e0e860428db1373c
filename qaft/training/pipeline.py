"""A whole run from a validated config: train, evaluate, save the deployable model, write the record.

``qaft.training.cli`` validates and calls :func:`run`; everything here assumes :func:`qaft.training.config.validate`
has passed, so an exception from here on is a run that did not finish, recorded with its status
(:mod:`qaft.training.records`): ``failed``, ``diverged`` or ``interrupted``. A run folder belongs to one process at a
time (:class:`qaft.training.run_control.RunLock`); a finished ``ok`` run is not run again (``resume=never`` forces it).
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from qaft import progress
from qaft.data import NeedsModel, lm_eval_windows, load_lm_texts
from qaft.data.stream import RunData
from qaft.deploy.checkpoint import deployed_form, save_merged
from qaft.evaluation.deployed import end_of_run, format_table
from qaft.evaluation.perplexity import Batch, batches_perplexity, window_batches
from qaft.files import remove_stale_temporaries
from qaft.methods import gptq_quantize_model
from qaft.models import load_causal_lm, load_tokenizer
from qaft.training.config import ConfigError, RunSpec, run_name, validate
from qaft.training.identity import config_digest, differences, identity_config
from qaft.training.module import DivergenceGuard, ProgressLines, QaftModule, SafeCheckpointIO, TrainingStats
from qaft.training.records import (
    DIVERGED,
    FAILED,
    INTERRUPTED,
    OK,
    RECORD_FILE,
    Diverged,
    MetricsRecorder,
    RunInterrupted,
    RunRecord,
    read_record,
    training_cost,
    trim_metrics,
)
from qaft.training.run_control import RunLock, SignalGuard, StopOnSignal
from qaft.training.run_dir import discard_run_dir
from qaft.training.tracking import track

CHECKPOINTS, LAST, MERGED = "checkpoints", "last.ckpt", "merged_model"


class ResumeRefused(ConfigError):
    """A checkpoint that is not this run's: resuming it would train something other than the config says."""


def run_dir_of(cfg: DictConfig) -> Path:
    """The run folder: Hydra's output folder inside a Hydra app, else ``runs_root/<name>-<identity digest>``."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    name = run_name(cfg.method, cfg.model.name_or_path, cfg.data.name, cfg.seed)
    return Path(cfg.runs_root) / f"{name}-{config_digest(cfg)}"


def build_trainer(cfg: DictConfig, run_dir: Path, guard: SignalGuard) -> pl.Trainer:
    """Lightning's Trainer from ``cfg.trainer`` plus qaft's record, safety, progress and checkpoint callbacks, and
    the config's own ``callbacks`` (``_target_`` nodes, e.g. a profiler or a test's probe).

    Lightning's progress bar is drawn only on a terminal: in a file (a SLURM log) its carriage returns make one
    unreadable line, so there :class:`ProgressLines` prints a line every ``progress.every_n_steps`` instead."""
    callbacks: list[pl.Callback] = [
        TrainingStats(),
        ProgressLines(_progress(cfg)["every_n_steps"]),
        DivergenceGuard(cfg.divergence.loss_vs_uniform),
        MetricsRecorder(run_dir),
        StopOnSignal(guard, run_dir / CHECKPOINTS / LAST),
        ModelCheckpoint(dirpath=run_dir / CHECKPOINTS, save_last=True, save_top_k=0,
                        every_n_train_steps=int(cfg.checkpoint.every_n_steps), enable_version_counter=False),
    ]
    callbacks += [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    logger = instantiate(cfg.logger, save_dir=str(run_dir), name=run_dir.name) if cfg.logger.get("_target_") else False
    bar = bool(cfg.trainer.get("enable_progress_bar", True)) and sys.stdout.isatty()
    return instantiate(cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(run_dir),
                       plugins=[SafeCheckpointIO()], enable_progress_bar=bar)


def _progress(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.progress`` with its defaults (a config written before it existed has none)."""
    return {"every_n_steps": 10, "every_s": 30.0} | dict(cfg.get("progress") or {})


def resume_checkpoint(cfg: DictConfig, run_dir: Path, identity: dict[str, Any]) -> str | None:
    """``resume=auto``: the folder's ``last.ckpt`` when there is one; a path: that file; ``never``: none.

    The checkpoint must carry this run's identity; anything else is refused (:class:`ResumeRefused`).
    """
    choice = str(cfg.resume)
    last = run_dir / CHECKPOINTS / LAST
    path = {"auto": last if last.is_file() else None, "never": None}.get(choice, Path(choice))
    if path is None:
        rank_zero_only(_start_over)(run_dir)
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - not a checkpoint, or one that would need to run code to load
        raise ResumeRefused(f"resume: {path} is not a readable checkpoint ({type(err).__name__}); "
                            "rerun with resume=never to start over") from None
    theirs = saved.get("qaft", {}).get("identity")
    if theirs is None:
        raise ResumeRefused(f"resume: {path} carries no run identity (written by an older qaft); "
                            "rerun with resume=never to start over")
    if theirs != identity:
        raise ResumeRefused(f"resume: {path} was trained with another config ({'; '.join(differences(theirs, identity))}); "
                            "rerun with resume=never to start over, or without resume=<path>")
    rank_zero_only(trim_metrics)(run_dir, int(saved["global_step"]))
    return str(path)


def _start_over(run_dir: Path) -> None:
    """A run that starts at step 0 keeps nothing of an earlier attempt in its folder (rows, checkpoints, record)."""
    trim_metrics(run_dir, 0)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    (run_dir / RECORD_FILE).unlink(missing_ok=True)


def _lm_batches(cfg: DictConfig, tokenizer: Any, data: RunData) -> list[Batch]:
    texts = load_lm_texts(cfg.data.source, cfg.data.get("config"))[cfg.eval.split]
    windows = lm_eval_windows(tokenizer, texts, int(cfg.eval.seq_len), cfg.eval.max_tokens)
    return window_batches(windows, int(cfg.eval.batch_size))


def _instruct_batches(cfg: DictConfig, tokenizer: Any, data: RunData) -> list[Batch]:
    data.inner.setup("test")
    loaders = {"test": data.inner.test_dataloader, "validation": data.inner.val_dataloader}
    batches = list(loaders[cfg.eval.split]())
    return batches[: cfg.eval.max_batches] if cfg.eval.max_batches else batches


EVAL_SETS = {"lm": _lm_batches, "instruct": _instruct_batches}


def _train(cfg: DictConfig, module: QaftModule, data: RunData, trainer: pl.Trainer, ckpt: str | None) -> dict:
    if not module.trains:
        return {}
    trainer.fit(module, datamodule=data, ckpt_path=ckpt, weights_only=True)
    expected = 1 if cfg.trainer.get("fast_dev_run") else int(cfg.trainer.max_steps)
    if trainer.global_step != expected:  # a run record must never claim steps that did not happen
        raise RuntimeError(f"training stopped at step {trainer.global_step} of {expected}")
    # The optimizer (its state: 2x what trains) and the tensors it references would outlive the in-place merge.
    trainer.strategy.optimizers, trainer.strategy.lr_scheduler_configs = [], []
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
    cost = rank_zero_only(training_cost)(trainer.default_root_dir) or {}
    return {"final_" + k.replace("/", "_"): v for k, v in metrics.items()} | {
        "global_step": trainer.global_step, "cost": cost}


def _gptq_deployment(spec: RunSpec, data: RunData) -> Callable[[torch.nn.Module], torch.nn.Module] | None:
    """GPTQ of a float model at the run's bits / group size on training batches (``eval.gptq``), or None."""
    options = spec.eval_gptq
    if options is None:
        return None
    return functools.partial(gptq_quantize_model, calib_batches=data.calibration_batches(options.calib_batches),
                             bits=spec.bits, group_size=spec.group_size, act_order=options.act_order,
                             percdamp=options.percdamp)


def _evaluate(cfg: DictConfig, spec: RunSpec, module: QaftModule, data: RunData,
              staged: Path | None) -> tuple[dict, torch.nn.Module]:
    """End-of-run perplexities and the deployed model; the merged model is saved to ``staged`` (if given)
    before a float merge is quantized for deployment."""
    batches = EVAL_SETS[cfg.data.kind](cfg, module.tokenizer, data)
    device = next(module.model.parameters()).device

    def load_float() -> torch.nn.Module:
        return load_causal_lm(cfg.model.name_or_path, getattr(torch, cfg.model.dtype))[0].to(device)

    def save(merged: torch.nn.Module) -> None:
        save_merged(merged, staged, module.tokenizer)

    ppl, deployed = end_of_run(module.model, batches, spec.bits, spec.group_size,
                               load_float if cfg.eval.baselines else None, _gptq_deployment(spec, data),
                               save if staged is not None else None)
    return {f"ppl_{k}": v for k, v in ppl.items()} | {"eval_tokens": sum(
        int((b.get("labels", b["input_ids"])[:, 1:] != -100).sum()) for b in batches)}, deployed


def _corpus_perplexity(corpus: DictConfig, deployed: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
    """``eval.corpus``: the deployed model's perplexity on a second corpus (the papers' WikiText-2, 2048-token
    windows, while the run trains on instructions), as ``ppl_<name>``."""
    texts = load_lm_texts(corpus.source, corpus.get("config"))[corpus.split]
    windows = lm_eval_windows(tokenizer, texts, int(corpus.seq_len), corpus.get("max_tokens"))
    batches = window_batches(windows, int(corpus.batch_size))
    return {f"ppl_{corpus.name}": batches_perplexity(deployed, batches, f"perplexity [{corpus.name}]")}


def _lm_eval(cfg: DictConfig, deployed: torch.nn.Module, tokenizer: Any, form: str) -> dict[str, Any]:
    """The config's lm-eval tasks on the deployed model, with the harness settings recorded beside them."""
    from qaft.evaluation.harness import run_tasks

    opts = cfg.eval.lm_eval
    return run_tasks(deployed, tokenizer, list(cfg.eval.tasks), batch_size=int(opts.batch_size),
                     max_length=int(opts.max_length), model_form=form, limit=opts.limit)


def _check_finite(metrics: dict[str, Any]) -> None:
    bad = sorted(k for k, v in metrics.items() if k.startswith("ppl_") and not math.isfinite(v))
    if bad:
        raise Diverged(f"non-finite final metric(s) {bad}: the deployed model's outputs are not finite")


def _float_model(cfg: DictConfig) -> torch.nn.Module:
    """The run's model as loaded, before any method: what generates data-free training data (on the GPU if the
    run has one)."""
    model = load_causal_lm(cfg.model.name_or_path, getattr(torch, cfg.model.dtype))[0]
    on_gpu = torch.cuda.is_available() and str(cfg.trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda")
    return model.to("cuda" if on_gpu else "cpu")


def _run_data(cfg: DictConfig) -> RunData:
    """The run's data; a DataModule that generates its data from the float model gets a loader for it."""
    inner = instantiate(cfg.data.datamodule, tokenizer=load_tokenizer(cfg.model.name_or_path))
    if isinstance(inner, NeedsModel):
        inner.use_model(functools.partial(_float_model, cfg),
                        {"name_or_path": str(cfg.model.name_or_path), "dtype": str(cfg.model.dtype)})
    return RunData(inner, int(cfg.seed))


def _run(cfg: DictConfig, spec: RunSpec, run_dir: Path, record: RunRecord, metrics: dict[str, Any],
         guard: SignalGuard, ckpt: str | None) -> dict[str, Any] | None:
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    progress.say(f"run {run_dir.name}: loading model {cfg.model.name_or_path} and data {cfg.data.name}")
    # The data comes first: a method calibrated on training batches (GPTQ) needs them to be built.
    data = _run_data(cfg)
    calibration = spec.method.calibration()
    calib = data.calibration_batches(calibration.calib_batches) if calibration is not None else None
    module = QaftModule(cfg, spec.method, calib, identity_config(cfg))
    trainer = build_trainer(cfg, run_dir, guard)
    track(trainer.logger, record)
    record.lap("load")
    metrics |= _train(cfg, module, data, trainer, ckpt)
    record.lap("train")
    if not trainer.is_global_zero:
        return None
    staged = run_dir / f".{MERGED}.pending" if cfg.save_model else None  # kept only if the run ends ok
    results, deployed = _evaluate(cfg, spec, module, data, staged)
    metrics |= results
    if cfg.eval.get("corpus"):
        metrics |= _corpus_perplexity(cfg.eval.corpus, deployed, module.tokenizer)
    metrics["deployed"] = deployed_form("ppl_merged_ptq" not in results, spec.bits, spec.group_size)
    if cfg.eval.tasks:
        metrics["lm_eval"] = _lm_eval(cfg, deployed, module.tokenizer, metrics["deployed"]["form"])
    record.lap("eval")
    _check_finite(metrics)
    if staged is not None:
        shutil.rmtree(run_dir / MERGED, ignore_errors=True)
        os.replace(staged, run_dir / MERGED)
        metrics["merged_model_path"] = MERGED  # relative: a copied or moved run folder stays whole
        record.lap("save")
    record.finish(OK, metrics)
    print(f"\n{format_table({k[4:]: v for k, v in results.items() if k.startswith('ppl_')}, spec.method.name, spec.bits, spec.group_size)}")
    print(f"record: {run_dir / RECORD_FILE}")
    return metrics


def _status(err: BaseException) -> tuple[str, BaseException]:
    if isinstance(err, SIGTERMException):  # Lightning's own SIGTERM exit (a signal between two of our checks)
        return INTERRUPTED, RunInterrupted(signal.SIGTERM)
    if isinstance(err, KeyboardInterrupt):
        return INTERRUPTED, RunInterrupted(signal.SIGINT)
    return (INTERRUPTED if isinstance(err, RunInterrupted) else DIVERGED if isinstance(err, Diverged) else FAILED), err


def _preset() -> str | None:
    """The ``method`` option Hydra composed (``loftq_int`` is LoftQ on the integer base), if any."""
    return HydraConfig.get().runtime.choices.get("method") if HydraConfig.initialized() else None


def _finished(run_dir: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The metrics of an ``ok`` record already in the folder (a rerun of a finished run does nothing)."""
    record = read_record(run_dir)
    if str(cfg.resume) == "never" or not record or record.get("status") != OK:
        return None
    print(f"qaft-train: {run_dir} already finished (status ok); resume=never runs it again")
    return record.get("metrics", {})


def run(cfg: DictConfig, spec: RunSpec | None = None) -> dict[str, Any] | None:
    """Run the job ``cfg`` describes; returns its final metrics (``None`` on ranks other than 0).

    An invalid config raises :class:`ConfigError` before anything is written; after that, a run that does not
    finish leaves its record (``failed``, ``diverged`` or ``interrupted``) and re-raises.
    """
    spec = spec or validate(cfg)
    run_dir, identity = run_dir_of(cfg), identity_config(cfg)
    with progress.reporting(rank_zero_only.rank == 0, float(_progress(cfg)["every_s"])):
        return _owned_run(cfg, spec, run_dir, identity)


def _owned_run(cfg: DictConfig, spec: RunSpec, run_dir: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """:func:`run` once the folder is known: under its lock, with its record."""
    lock = RunLock(run_dir).acquire() if rank_zero_only.rank == 0 else None
    try:
        if rank_zero_only.rank == 0 and (done := _finished(run_dir, cfg)) is not None:
            return done
        with SignalGuard() as guard:
            ckpt = resume_checkpoint(cfg, run_dir, identity)  # a refused checkpoint costs no model load
            remove_stale_temporaries(run_dir / CHECKPOINTS)
            record = RunRecord(run_dir, cfg, spec, config_digest(identity), _preset())
            record.write_config()
            metrics: dict[str, Any] = {}
            try:
                return _run(cfg, spec, run_dir, record, metrics, guard, ckpt)
            except BaseException as err:  # KeyboardInterrupt too: the record must not look finished
                status, reason = _status(err)
                shutil.rmtree(run_dir / f".{MERGED}.pending", ignore_errors=True)  # a model of a run that did not end ok
                record.finish(status, metrics, error=reason)
                if reason is not err:
                    raise reason from None
                raise
    finally:
        if lock is not None:
            lock.release()


__all__ = ["ConfigError", "ResumeRefused", "build_trainer", "discard_run_dir", "run", "run_dir_of"]
