"""One method-agnostic LightningModule for every qaft method, and the resumable data stream it trains on.

The module knows nothing about any particular method: it applies ``config`` through the core API, moves the
phases at optimizer-step boundaries with :func:`qaft.set_training_step`, and builds AdamW once from
:func:`qaft.parameter_groups` (one group per role, each with its own lr and weight decay). Methods that need
calibration data (GPTQ) get it from :meth:`RunData.calibration_batches`.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Sampler

import qaft
from qaft.config_schema import SCHEDULES
from qaft.methods.config import MethodConfig
from qaft.methods.gptq_model import GPTQOptions, apply_method_calibrated, needs_calibration
from qaft.model import qaft_layers
from qaft.models import load_causal_lm
from qaft.peak_memory import PeakMemory

# Quantizer state worth keeping in a checkpoint even where it is a buffer (symmetric offsets, QA-LoRA's s, b).
QUANT_STATE = ("scale", "offset", "magnitude")


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Linear warm-up to 1, then the named schedule over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return SCHEDULES[schedule](progress)


class QaftModule(pl.LightningModule):
    """Causal LM with a qaft method applied; trains whatever the method's current phase trains."""

    def __init__(self, cfg: DictConfig, method: MethodConfig,
                 calib_batches: list[dict[str, torch.Tensor]] | None = None, gptq: GPTQOptions | None = None) -> None:
        """``calib_batches`` / ``gptq``: the calibration data and GPTQ options of a method that needs them."""
        super().__init__()
        self.cfg, self.method = cfg, method
        # Checkpoints hold only trained tensors; everything else is rebuilt from config + seed.
        self.strict_loading = False
        dtype = getattr(torch, cfg.model.dtype)
        self.model, self.tokenizer = load_causal_lm(cfg.model.name_or_path, dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # adapter init depends on the seed only, so a resume rebuilds it
            apply_method_calibrated(self.model, method, calib_batches, gptq)
        # A calibrated (GPTQ) base is rebuilt, not stored: its fingerprint lets a resume prove it rebuilt the same.
        self.base_digest = self._frozen_digest() if needs_calibration(method) else None
        if cfg.optim.gradient_checkpointing:
            self.model.config.use_cache = False
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()

    @property
    def trains(self) -> bool:
        """False for methods with nothing to train (PTQ): the run only evaluates."""
        return any(qaft.parameter_groups(self.model).values())

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def setup(self, stage: str) -> None:
        # DDP registers only tensors that require grad when it wraps the model, so every tensor that trains in
        # *some* phase must require grad now; on_train_start puts the current phase back.
        for params in qaft.parameter_groups(self.model).values():
            for p in params:
                p.requires_grad_(True)

    def on_train_start(self) -> None:
        phase = self.method.phase_at(self.global_step)
        for layer in qaft_layers(self.model):
            layer.set_phase(phase)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        qaft.set_training_step(self.model, self.global_step)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
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
            for role, params in qaft.parameter_groups(self.model).items() if params
        ]
        optimizer = torch.optim.AdamW(groups, betas=tuple(optim.betas), eps=float(optim.eps))
        total, warmup, schedule = int(self.trainer.max_steps), int(optim.warmup_steps), str(optim.schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, warmup, total, schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def checkpoint_keys(self) -> set[str]:
        """State-dict keys of what trains in any phase plus quantizer state: the whole checkpoint."""
        trained = {id(p) for params in qaft.parameter_groups(self.model).values() for p in params}
        keys = {name for name, p in self.named_parameters() if id(p) in trained}
        layers = set(qaft_layers(self.model))
        for layer_name, layer in self.named_modules():
            if layer in layers:
                keys |= {f"{layer_name}.{b}" for b, _ in layer.named_buffers(recurse=False) if b in QUANT_STATE}
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
        checkpoint["qaft"] = {"method": self.method.to_dict(), "seed": int(self.cfg.seed),
                              "base_digest": self.base_digest}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before the state dict loads: trained adapters on a different base would train on silently.
        saved = checkpoint.get("qaft", {}).get("base_digest")
        if saved != self.base_digest:
            raise RuntimeError("resume: the GPTQ base rebuilt from the calibration data differs from the one the "
                               "checkpoint was trained on (other data, options or numerics); rerun with resume=never")


class TrainingStats(pl.Callback):
    """Logs what the step cost: tokens/s (all ranks), peak memory, trainable parameters, lr per role.

    A callback so that the step time covers forward, backward and the optimizer; lr is read before the
    scheduler advances, i.e. the lr the step used. Peak memory is this run's own (:mod:`qaft.peak_memory`),
    also when a sweep runs many runs in one process.
    """

    def __init__(self) -> None:
        self._start, self._lrs = 0.0, {}
        self.memory = PeakMemory()

    def on_train_start(self, trainer: pl.Trainer, pl_module: QaftModule) -> None:
        self.memory.start(pl_module.model)

    def on_train_end(self, trainer: pl.Trainer, pl_module: QaftModule) -> None:
        self.memory.stop()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.memory.stop()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
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
            "train/trainable_params": float(qaft.count_parameters(pl_module.model)),
            **self._lrs,
        }, on_step=True, on_epoch=False, rank_zero_only=True)


class StreamSampler(Sampler[int]):
    """The whole run's sample order as one stream, so that a resumed run continues it exactly.

    Pass ``p`` over the data is ``randperm(n)`` seeded by ``seed + p``; rank ``r`` of ``world`` takes every
    ``world``-th item; ``start`` items (all ranks together) were consumed before a resume.
    """

    def __init__(self, n: int, total: int, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
        if n <= 0:
            raise ValueError("the training split is empty")
        self.n, self.total, self.seed, self.start, self.rank, self.world = n, total, seed, start, rank, world

    def _indices(self) -> range:
        return range(self.start + self.rank, self.total, self.world)

    def __len__(self) -> int:
        return len(self._indices())

    def __iter__(self):
        perms: dict[int, list[int]] = {}
        for i in self._indices():
            p, j = divmod(i, self.n)
            if p not in perms:
                perms.clear()
                perms[p] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + p)).tolist()
            yield perms[p][j]


class RunData(pl.LightningDataModule):
    """Wraps a qaft DataModule: its validation / test loaders as they are, its training set as a stream.

    The stream covers exactly ``max_steps`` optimizer steps and starts after the steps a restored checkpoint
    already took, which Lightning's own restart (it replays an epoch from its first batch) does not do.
    """

    def __init__(self, inner: pl.LightningDataModule, seed: int) -> None:
        super().__init__()
        self.inner, self.seed = inner, seed

    def setup(self, stage: str | None = None) -> None:
        self.inner.setup(stage)

    def calibration_batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        """The first ``n`` batches of the stream a one-process run trains on from step 0 (GPTQ's data).

        Independent of rank, world size and resume step, so every rank and every resume rebuild the same base.
        """
        base = self.inner.train_dataloader()
        sampler = StreamSampler(len(base.dataset), n * base.batch_size, self.seed)
        return list(DataLoader(base.dataset, batch_size=base.batch_size, sampler=sampler, collate_fn=base.collate_fn))

    def train_dataloader(self) -> DataLoader:
        base = self.inner.train_dataloader()
        trainer = self.trainer
        per_step = base.batch_size * trainer.accumulate_grad_batches * trainer.world_size
        sampler = StreamSampler(len(base.dataset), int(trainer.max_steps) * per_step, self.seed,
                                start=trainer.global_step * per_step, rank=trainer.global_rank,
                                world=trainer.world_size)
        return DataLoader(base.dataset, batch_size=base.batch_size, sampler=sampler, drop_last=True,
                          collate_fn=base.collate_fn, num_workers=base.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.inner.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.inner.test_dataloader()

