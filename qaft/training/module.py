"""One method-agnostic LightningModule for every qaft method, and the callbacks every run trains with.

The module knows nothing about any particular method: it applies ``config`` through the core API, moves the
phases at optimizer-step boundaries with :func:`qaft.set_training_step`, and builds AdamW once from
:func:`qaft.parameter_groups` (one group per role, each with its own lr and weight decay). Methods that need
calibration data (GPTQ) get it from :meth:`qaft.data.stream.RunData.calibration_batches`. A method with a teacher
(``method.teacher(model)`` is not ``None``: LLM-QAT) trains on the distillation loss against the frozen float
model's logits, computed in the same step (:func:`qaft.methods.distill.distilled_loss`); every other method on
the labels. Validation is always the label loss.

A checkpoint holds only what trains (plus quantizer state), the run's identity and the RNG state, so that a
resume continues the exact computation; :class:`DivergenceGuard` stops a run at its first non-finite number.
"""
from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from omegaconf import DictConfig

from qaft.files import atomic_write
from qaft.methods import apply_method, count_parameters, parameter_groups, set_training_step
from qaft.methods.api import qaft_layers
from qaft.methods.config import MethodConfig
from qaft.methods.distill import distilled_loss
from qaft.models import load_causal_lm
from qaft.progress import duration, say
from qaft.training.config import SCHEDULES, ConfigError
from qaft.training.peak_memory import PeakMemory, sampled_step
from qaft.training.records import Diverged


class CheckpointMismatch(ConfigError):
    """A checkpoint whose tensors are not the ones this run trains, or whose contents changed since it was saved."""


def _digest_into(digest: Any, path: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        digest.update(f"{path}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            _digest_into(digest, f"{path}/{key}", value[key])
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _digest_into(digest, f"{path}[{i}]", item)
    else:
        digest.update(f"{path}={value!r}".encode() if isinstance(value, (int, float, str, bool, type(None)))
                      else f"{path}:{type(value).__name__}".encode())


def checkpoint_digest(checkpoint: dict[str, Any]) -> str:
    """SHA-256 of everything a checkpoint holds but its own digest (tensors by their bytes), stored in it at save
    and checked before a resume, so a tensor edited in place is found."""
    qaft = {k: v for k, v in checkpoint.get("qaft", {}).items() if k != "sha256"}
    digest = hashlib.sha256()
    _digest_into(digest, "", {**checkpoint, "qaft": qaft})
    return digest.hexdigest()


def checkpoint_damage(checkpoint: dict[str, Any]) -> str | None:
    """Why a loaded checkpoint cannot be trusted (no digest, or contents that do not match it), or ``None``."""
    saved = checkpoint.get("qaft", {}).get("sha256")
    if saved is None:
        return "it carries no content digest (written by an older qaft)"
    if saved != checkpoint_digest(checkpoint):
        return "its contents changed since it was saved (they do not match the digest it carries)"
    return None


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Linear warm-up to 1, then the named schedule over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return SCHEDULES[schedule](progress)


class QaftModule(pl.LightningModule):
    """Causal LM with a qaft method applied; trains whatever the method's current phase trains."""

    def __init__(self, cfg: DictConfig, method: MethodConfig,
                 calib_batches: list[dict[str, torch.Tensor]] | None = None,
                 identity: dict[str, Any] | None = None) -> None:
        """``calib_batches``: the calibration data of a method that needs it (``method.calibration_options()``);
        ``identity``: the run's identity config (:mod:`qaft.training.identity`), stored in every checkpoint."""
        super().__init__()
        self.cfg, self.method, self.identity = cfg, method, identity or {}
        # Checkpoints hold only trained tensors; everything else is rebuilt from config + seed.
        self.strict_loading = False
        dtype = getattr(torch, cfg.model.dtype)
        self.model, self.tokenizer = load_causal_lm(cfg.model.name_or_path, dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # adapter init depends on the seed only, so a resume rebuilds it
            apply_method(self.model, method, calib_batches=calib_batches)
        # A calibrated base (GPTQ, Block-AP's codes) is rebuilt, not stored: its fingerprint lets a resume prove it
        # rebuilt the same.
        self.base_digest = self._frozen_digest() if method.calibration_options() is not None else None
        if cfg.optim.gradient_checkpointing:
            self.model.config.use_cache = False
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()

    @property
    def trains(self) -> bool:
        """False for methods with nothing to train (PTQ): the run only evaluates."""
        return any(parameter_groups(self.model).values())

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def setup(self, stage: str) -> None:
        # DDP registers only tensors that require grad when it wraps the model, so every tensor that trains in
        # *some* phase must require grad now; on_train_start puts the current phase back.
        for params in parameter_groups(self.model).values():
            for p in params:
                p.requires_grad_(True)

    def on_train_start(self) -> None:
        phase = self.method.phase_at(self.global_step)
        for layer in qaft_layers(self.model):
            layer.set_phase(phase)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        set_training_step(self.model, self.global_step)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        teacher = self.method.teacher(self.model)
        loss = self.model(**batch).loss if teacher is None else distilled_loss(self.model, batch, teacher)
        self.last_loss = loss.detach()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.cfg.optim
        groups = [
            {"params": params, "name": role, "lr": float(optim.lr[role]),
             "weight_decay": float(optim.weight_decay.get(role, 0.0))}
            for role, params in parameter_groups(self.model).items() if params
        ]
        optimizer = torch.optim.AdamW(groups, betas=tuple(optim.betas), eps=float(optim.eps))
        total, warmup, schedule = int(self.trainer.max_steps), int(optim.warmup_steps), str(optim.schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, warmup, total, schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def checkpoint_keys(self) -> set[str]:
        """State-dict keys of what trains in any phase plus quantizer state: the whole checkpoint."""
        trained = {id(p) for params in parameter_groups(self.model).values() for p in params}
        keys = {name for name, p in self.named_parameters() if id(p) in trained}
        layers = set(qaft_layers(self.model))
        for layer_name, layer in self.named_modules():
            if layer in layers:
                keys |= {f"{layer_name}.{b}" for b in layer.state_buffers()}
        return keys

    def _frozen_digest(self) -> str:
        """SHA-256 of every buffer of the method layers (codes, scales, offsets), in name order."""
        digest = hashlib.sha256()
        layers = set(qaft_layers(self.model))
        for name, module in self.model.named_modules():
            if module in layers:
                for buffer_name, buffer in sorted(module.named_buffers(recurse=False)):
                    digest.update(f"{name}.{buffer_name}".encode())
                    digest.update(buffer.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.checkpoint_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        rng = {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available()
                                                else {})
        checkpoint["qaft"] = {"identity": self.identity, "base_digest": self.base_digest, "rng": rng}
        checkpoint["qaft"]["sha256"] = checkpoint_digest(checkpoint)

    def _check_tensors(self, saved: dict[str, torch.Tensor]) -> None:
        """Loading is strict: every tensor that trains is in the checkpoint, with its shape and dtype, and nothing
        else is (Lightning's own loading is not strict, since the frozen base is never saved)."""
        expected, own = self.checkpoint_keys(), self.state_dict()
        missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
        if missing or unexpected:
            name = (missing or unexpected)[0]
            raise CheckpointMismatch(f"resume: the checkpoint {'lacks' if missing else 'has an unexpected'} tensor "
                                     f"{name!r} ({len(missing)} missing, {len(unexpected)} unexpected); rerun with "
                                     "resume=never to start over")
        for name in sorted(expected):
            if saved[name].shape != own[name].shape or saved[name].dtype != own[name].dtype:
                raise CheckpointMismatch(f"resume: the checkpoint's tensor {name!r} is {saved[name].dtype} "
                                         f"{tuple(saved[name].shape)}, the run's is {own[name].dtype} "
                                         f"{tuple(own[name].shape)}; rerun with resume=never to start over")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before the state dict loads: trained adapters on a different base would train on silently.
        saved = checkpoint.get("qaft", {})
        if saved.get("base_digest") != self.base_digest:
            raise RuntimeError("resume: the base rebuilt from the calibration data (GPTQ, Block-AP) differs from the "
                               "one the checkpoint was trained on (other data, options or numerics); rerun with "
                               "resume=never")
        self._check_tensors(checkpoint["state_dict"])
        # Dropout draws from the global RNG: continue its stream where the checkpoint left it.
        rng = saved.get("rng", {})
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


class TrainingStats(pl.Callback):
    """Logs what the step cost: tokens/s (all ranks), peak memory, trainable parameters, lr per role.

    A callback so that the step time covers forward, backward and the optimizer; lr is read before the
    scheduler advances, i.e. the lr the step used. Peak memory is this run's own (:mod:`qaft.training.peak_memory`),
    also when a sweep runs many runs in one process, sampled in the steps that can set it
    (:func:`qaft.training.peak_memory.sampled_step`).
    """

    def __init__(self) -> None:
        self._start, self._lrs, self._first = 0.0, {}, 0
        self.memory = PeakMemory()

    def on_train_start(self, trainer: pl.Trainer, pl_module: QaftModule) -> None:
        self._first = trainer.global_step
        self.memory.start(pl_module.model)

    def on_train_end(self, trainer: pl.Trainer, pl_module: QaftModule) -> None:
        self.memory.stop()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.memory.stop()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: QaftModule, *args: Any) -> None:
        self.memory.watch(sampled_step(trainer.global_step, self._first, pl_module.method.phase_at))
        self._start = time.perf_counter()
        self._lrs = {f"lr/{g['name']}": g["lr"] for g in trainer.optimizers[0].param_groups}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: QaftModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        seconds = max(time.perf_counter() - self._start, 1e-9)
        tokens = int(batch["attention_mask"].sum()) * trainer.world_size
        pl_module.log_dict({
            "train/step_s": seconds,
            "train/tokens_per_s": tokens / seconds,
            "train/peak_memory_mb": self.memory.peak_bytes() / 2**20,
            "train/trainable_params": float(count_parameters(pl_module.model)),
            **self._lrs,
        }, on_step=True, on_epoch=False, rank_zero_only=True)


class ProgressLines(pl.Callback):
    """A line every ``every_n_steps`` optimizer steps, and at the first and last: step, loss, tokens/s since the
    start, elapsed time and ETA, flushed (:mod:`qaft.progress`), for output without a terminal, where Lightning's
    progress bar is off (:func:`qaft.training.pipeline.build_trainer`). Rank 0 only; ``0`` prints none. Time is
    counted from this process's first step, so a resumed run's ETA covers what is left of it."""

    def __init__(self, every_n_steps: int) -> None:
        self.every = int(every_n_steps)
        self._start, self._first, self._tokens = 0.0, 0, 0

    def _active(self, trainer: pl.Trainer) -> bool:
        return self.every > 0 and trainer.is_global_zero and trainer.progress_bar_callback is None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._first, self._tokens = time.perf_counter(), trainer.global_step, 0
        if self._active(trainer):
            resumed = f", resumed at step {self._first}" if self._first else ""
            say(f"train: {trainer.max_steps} steps{resumed}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._tokens += int(batch["attention_mask"].sum()) * trainer.world_size
        step, total = trainer.global_step, trainer.max_steps
        if not self._active(trainer) or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        if step % self.every and step != total and step != self._first + 1:
            return
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        loss = trainer.callback_metrics.get("train/loss")
        eta = elapsed / max(step - self._first, 1) * (total - step)
        say(f"train: step {step}/{total}, loss {'?' if loss is None else f'{float(loss):.4f}'}, "
            f"{self._tokens / elapsed:.0f} tokens/s, {duration(elapsed)}, ETA {duration(eta)}")


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One device sync for the lot, not one per tensor."""
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class DivergenceGuard(pl.Callback):
    """Stops training (raises :class:`Diverged`) at the first non-finite loss, gradient or trained tensor, and
    at a training loss above ``loss_vs_uniform * ln(vocab_size)``: a model that predicts worse than a uniform
    guess over its vocabulary has diverged, even where its numbers stay finite (``None``: finiteness only).

    Gradients are checked before the optimizer step and trained tensors right after it, before any checkpoint
    of that step is written (Lightning runs checkpoint callbacks last), so the last checkpoint stays the last
    sound state. Every rank takes part in the decision, so that all stop at the same step.
    """

    def __init__(self, loss_vs_uniform: float | None = None) -> None:
        self.loss_vs_uniform = loss_vs_uniform

    def _loss_problem(self, loss: torch.Tensor | None, vocab_size: int) -> str | None:
        if loss is None:
            return None
        if not bool(torch.isfinite(loss)):
            return f"non-finite loss ({float(loss)})"
        limit = None if self.loss_vs_uniform is None else self.loss_vs_uniform * math.log(vocab_size)
        if limit is not None and float(loss) > limit:
            return f"loss {float(loss):.3f} above {self.loss_vs_uniform} x ln(vocab) = {limit:.3f} (worse than a uniform guess)"
        return None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: QaftModule, optimizer: Any) -> None:
        bad = self._loss_problem(getattr(pl_module, "last_loss", None), pl_module.model.config.vocab_size)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if bad is None and not _all_finite(grads):
            bad = "non-finite gradient"
        self._check(trainer, bad and f"{bad} at step {trainer.global_step + 1}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: QaftModule, *args: Any) -> None:
        params = [p for group in parameter_groups(pl_module.model).values() for p in group]
        ok = _all_finite([p.detach() for p in params])
        self._check(trainer, None if ok else f"non-finite trained tensor after step {trainer.global_step}")

    @staticmethod
    def _check(trainer: pl.Trainer, problem: str | None) -> None:
        if trainer.strategy.reduce_boolean_decision(problem is not None, all=False):
            raise Diverged(f"{problem or 'divergence on another rank'}; the last checkpoint is the last sound "
                           "state (lower the learning rate or check the data)")


class SafeCheckpointIO(TorchCheckpointIO):
    """Checkpoints that neither run code nor leave debris.

    Written to a temporary file beside the target and renamed into place (a kill mid-write keeps the previous
    checkpoint and leaves nothing in the system's temporary folder; :func:`qaft.files.remove_stale_temporaries`
    clears a killed writer's file on the next start), and read back with ``weights_only=True``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
