"""A whole run from a validated config: train, evaluate, save the deployable model, write the record.

``qaft.train`` validates and calls :func:`run`; everything here assumes :func:`qaft.config_schema.validate`
has passed, so any exception from here on is a failed *run* (recorded as such), not a bad config.
"""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from qaft.config_schema import ConfigError, RunSpec, run_name, validate
from qaft.data import lm_eval_windows, load_lm_texts
from qaft.evaluate import Batch, batches_perplexity, end_of_run, format_table, is_integer_model, window_batches
from qaft.lightning import QaftModule, RunData, TrainingStats
from qaft.methods.gptq_model import gptq_quantize_model
from qaft.models import load_causal_lm, load_tokenizer
from qaft.records import MetricsRecorder, RunRecord, training_cost, trim_metrics

CHECKPOINTS, LAST = "checkpoints", "last.ckpt"


def run_dir_of(cfg: DictConfig) -> Path:
    """The run folder: Hydra's output folder inside a Hydra app, else the config's name under ``runs_root``."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.runs_root) / run_name(cfg.method, cfg.model.name_or_path, cfg.data.name, cfg.seed)


def discard_run_dir(runs_root: str | None = None) -> None:
    """Remove the folder Hydra made for a run whose config turned out invalid, if it holds only Hydra's files,
    and the parents up to ``runs_root`` that this left empty: nothing may look like a run that happened."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir).resolve()
    if not out.is_dir() or not {p.name for p in out.iterdir()} <= {".hydra", f"{hydra_cfg.job.name}.log"}:
        return
    shutil.rmtree(out)
    root = Path(runs_root).resolve() if runs_root else out.parent
    parent = out.parent
    while parent.is_relative_to(root) and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


class DumpTrainable(pl.Callback):
    """Each rank saves its trained tensors at the end (the DDP test checks that ranks agree)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: QaftModule) -> None:
        keys = pl_module.checkpoint_keys()
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items() if k in keys}
        torch.save(state, self.run_dir / f"trainable_rank{trainer.global_rank}.pt")


class CrashAfter(pl.Callback):
    """Hard-exits, like a killed job, once ``steps`` optimizer steps are done (the resume test)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.steps:
            os._exit(3)


def build_trainer(cfg: DictConfig, run_dir: Path) -> pl.Trainer:
    """Lightning's Trainer from ``cfg.trainer`` plus qaft's record, checkpoint and debug callbacks."""
    callbacks: list[pl.Callback] = [
        TrainingStats(),
        MetricsRecorder(run_dir),
        ModelCheckpoint(dirpath=run_dir / CHECKPOINTS, save_last=True, save_top_k=0,
                        every_n_train_steps=int(cfg.checkpoint.every_n_steps), enable_version_counter=False),
    ]
    if cfg.debug.dump_trainable:
        callbacks.append(DumpTrainable(run_dir))
    if cfg.debug.crash_after_steps:
        callbacks.append(CrashAfter(int(cfg.debug.crash_after_steps)))
    logger = instantiate(cfg.logger, save_dir=str(run_dir), name=run_dir.name) if cfg.logger.get("_target_") else False
    return instantiate(cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(run_dir))


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """``resume=auto`` continues from the folder's ``last.ckpt`` when there is one; a path resumes from it."""
    last = run_dir / CHECKPOINTS / LAST
    choices: dict[str, Callable[[], Path | None]] = {
        "auto": lambda: last if last.is_file() else None, "never": lambda: None}
    choice = str(cfg.resume)
    path = choices[choice]() if choice in choices else Path(choice)
    if path is None:
        return None
    step = torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    rank_zero_only(trim_metrics)(run_dir, step)
    return str(path)


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


def save_merged(merged: torch.nn.Module, tokenizer: Any, run_dir: Path) -> Path:
    """Safetensors via ``save_pretrained`` for a float model; ``torch.save`` of the state dict when it holds
    packed integer codes, which ``from_pretrained`` could not rebuild anyway."""
    if is_integer_model(merged):
        path = run_dir / "merged_model.pt"
        torch.save({"state_dict": merged.state_dict(), "config": merged.config.to_dict(),
                    "qaft": merged.qaft_config.to_dict()}, path)
        return path
    path = run_dir / "merged_model"
    merged.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


def _train(cfg: DictConfig, module: QaftModule, data: RunData, trainer: pl.Trainer, run_dir: Path) -> dict:
    if not module.trains:
        return {}
    trainer.fit(module, datamodule=data, ckpt_path=resume_checkpoint(cfg, run_dir))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
    cost = rank_zero_only(training_cost)(run_dir) or {}
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


def _evaluate(cfg: DictConfig, spec: RunSpec, module: QaftModule,
              data: RunData) -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    batches = EVAL_SETS[cfg.data.kind](cfg, module.tokenizer, data)
    device = next(module.model.parameters()).device

    def load_float() -> torch.nn.Module:
        return load_causal_lm(cfg.model.name_or_path, getattr(torch, cfg.model.dtype))[0].to(device)

    ppl, merged, deployed = end_of_run(module.model, batches, spec.bits, spec.group_size,
                                       load_float if cfg.eval.baselines else None, _gptq_deployment(spec, data))
    return {f"ppl_{k}": v for k, v in ppl.items()} | {"eval_tokens": sum(
        int((b.get("labels", b["input_ids"])[:, 1:] != -100).sum()) for b in batches)}, merged, deployed


def _corpus_perplexity(corpus: DictConfig, deployed: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
    """``eval.corpus``: the deployed model's perplexity on a second corpus (the papers' WikiText-2, 2048-token
    windows, while the run trains on instructions), as ``ppl_<name>``."""
    texts = load_lm_texts(corpus.source, corpus.get("config"))[corpus.split]
    windows = lm_eval_windows(tokenizer, texts, int(corpus.seq_len), corpus.get("max_tokens"))
    return {f"ppl_{corpus.name}": batches_perplexity(deployed, window_batches(windows, int(corpus.batch_size)))}


def _lm_eval(cfg: DictConfig, deployed: torch.nn.Module, tokenizer: Any, form: str) -> dict[str, Any]:
    """The config's lm-eval tasks on the deployed model, with the harness settings recorded beside them."""
    from qaft.eval.harness import run_tasks

    opts = cfg.eval.lm_eval
    return run_tasks(deployed, tokenizer, list(cfg.eval.tasks), batch_size=int(opts.batch_size),
                     max_length=int(opts.max_length), model_form=form, limit=opts.limit)


def _run(cfg: DictConfig, spec: RunSpec, run_dir: Path, record: RunRecord) -> dict[str, Any] | None:
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    # The data comes first: a method calibrated on training batches (GPTQ) needs them to be built.
    data = RunData(instantiate(cfg.data.datamodule, tokenizer=load_tokenizer(cfg.model.name_or_path)), int(cfg.seed))
    calib = data.calibration_batches(spec.calibration.calib_batches) if spec.calibration else None
    module = QaftModule(cfg, spec.method, calib, spec.calibration)
    trainer = build_trainer(cfg, run_dir)
    record.lap("load")
    metrics = _train(cfg, module, data, trainer, run_dir)
    record.lap("train")
    if not trainer.is_global_zero:
        return None
    results, merged, deployed = _evaluate(cfg, spec, module, data)
    metrics |= results
    if cfg.eval.get("corpus"):
        metrics |= _corpus_perplexity(cfg.eval.corpus, deployed, module.tokenizer)
    if cfg.eval.tasks:
        form = "merged" if deployed is merged else "merged+ptq"
        metrics["lm_eval"] = _lm_eval(cfg, deployed, module.tokenizer, form)
    record.lap("eval")
    if cfg.save_model:
        metrics["merged_model_path"] = str(save_merged(merged, module.tokenizer, run_dir))
        record.lap("save")
    record.finish("ok", metrics)
    print(f"\n{format_table({k[4:]: v for k, v in results.items() if k.startswith('ppl_')}, spec.method.name, spec.bits, spec.group_size)}")
    print(f"record: {run_dir / 'record.json'}")
    return metrics


def run(cfg: DictConfig, spec: RunSpec | None = None) -> dict[str, Any] | None:
    """Run the job ``cfg`` describes; returns its final metrics (``None`` on ranks other than 0).

    An invalid config raises :class:`ConfigError` before anything is written; after that, any failure
    leaves a ``failed`` record and is re-raised.
    """
    spec = spec or validate(cfg)
    run_dir = run_dir_of(cfg)
    record = RunRecord(run_dir, cfg, spec)
    record.write_config()
    try:
        return _run(cfg, spec, run_dir, record)
    except BaseException as err:  # KeyboardInterrupt too: the record must not look finished
        record.finish("failed", error=err)
        raise


__all__ = ["ConfigError", "build_trainer", "discard_run_dir", "run", "run_dir_of", "save_merged"]
