"""The training data of a run as one seeded stream that resumes exactly, at any step.

A run trains on exactly ``max_steps`` optimizer steps, one epoch in Lightning's terms. Pass ``p`` over the
training set is ``randperm(n)`` seeded by ``seed + p``; rank ``r`` of ``world`` takes every ``world``-th item.

Resuming mid-epoch is where Lightning needs the loader's help: it restores its own batch counters and treats
the restored batches as already fetched, so the loader must report the *whole* epoch's length and, after
``load_state_dict`` (which Lightning calls on resume, before iterating), continue right after the batches it
had handed out. :class:`StreamLoader` is such a stateful loader. A loader that instead restarts its epoch
(or reports only the remaining batches) ends the resumed run early, at a step that depends on where it was
killed.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class StreamSampler(Sampler[int]):
    """The run's sample order: ``total`` items over all ranks, this rank's share from item ``start`` on.

    ``len()`` is this rank's share of the whole stream, wherever iteration starts (see the module doc).
    """

    def __init__(self, n: int, total: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if n <= 0:
            raise ValueError("the training split is empty")
        self.n, self.total, self.seed, self.rank, self.world = n, total, seed, rank, world
        self.start = 0

    def __len__(self) -> int:
        return len(range(self.rank, self.total, self.world))

    def __iter__(self) -> Iterator[int]:
        perms: dict[int, list[int]] = {}
        for i in range(self.start + self.rank, self.total, self.world):
            p, j = divmod(i, self.n)
            if p not in perms:
                perms.clear()
                perms[p] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + p)).tolist()
            yield perms[p][j]


class StreamLoader(DataLoader):
    """A DataLoader over a :class:`StreamSampler` that Lightning can checkpoint and resume (``_Stateful``).

    ``state_dict()`` counts the batches handed out; ``load_state_dict()`` makes the next iteration start after
    them. Its own generator keeps loader start-up off the global RNG, so a resumed run draws the same random
    numbers (dropout) as an uninterrupted one.
    """

    def __init__(self, dataset: Dataset, batch_size: int, sampler: StreamSampler, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                         generator=torch.Generator().manual_seed(sampler.seed), **kwargs)
        self.batches_done = 0

    def __iter__(self) -> Iterator[Any]:
        self.sampler.start = self.batches_done * self.batch_size * self.sampler.world
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        s = self.sampler
        return {"batches_done": self.batches_done, "n": s.n, "total": s.total, "seed": s.seed, "world": s.world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        s = self.sampler
        saved = {k: state.get(k) for k in ("n", "total", "seed", "world")}
        if saved != {"n": s.n, "total": s.total, "seed": s.seed, "world": s.world}:
            raise ValueError(f"resume: the checkpoint's data stream {saved} is not this run's "
                             f"(n={s.n}, total={s.total}, seed={s.seed}, world={s.world})")
        self.batches_done = int(state["batches_done"])


class RunData(pl.LightningDataModule):
    """Wraps a qaft DataModule: its validation / test loaders as they are, its training set as a stream.

    The stream covers exactly ``max_steps`` optimizer steps (all ranks, gradient accumulation included).
    """

    def __init__(self, inner: pl.LightningDataModule, seed: int) -> None:
        super().__init__()
        self.inner, self.seed = inner, seed

    def prepare_data(self) -> None:
        # Lightning calls it once per node before setup: generated data is generated (and cached) here
        self.inner.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.inner.setup(stage)

    @property
    def data_sha256(self) -> dict[str, str]:
        """``{path: sha256}`` of the local files the wrapped module parsed (after ``setup``; see
        :class:`~qaft.data.loaders.SplitDataModule`); empty for a module that does not say."""
        return dict(getattr(self.inner, "data_sha256", {}))

    def calibration_batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        """The first ``n`` batches of the stream a one-process run trains on from step 0 (GPTQ's data).

        Independent of rank, world size and resume step, so every rank and every resume rebuild the same base.
        """
        base = self.inner.train_dataloader()
        sampler = StreamSampler(len(base.dataset), n * base.batch_size, self.seed)
        return list(DataLoader(base.dataset, batch_size=base.batch_size, sampler=sampler, collate_fn=base.collate_fn))

    def train_dataloader(self) -> StreamLoader:
        base = self.inner.train_dataloader()
        trainer = self.trainer
        per_step = base.batch_size * trainer.accumulate_grad_batches * trainer.world_size
        sampler = StreamSampler(len(base.dataset), int(trainer.max_steps) * per_step, self.seed,
                                rank=trainer.global_rank, world=trainer.world_size)
        return StreamLoader(base.dataset, base.batch_size, sampler, collate_fn=base.collate_fn,
                            num_workers=base.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.inner.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.inner.test_dataloader()


__all__ = ["RunData", "StreamLoader", "StreamSampler"]
