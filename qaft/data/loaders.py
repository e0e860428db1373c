"""The loader half that every qaft DataModule shares: prepared splits in, seeded DataLoaders out."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader


class SplitDataModule(pl.LightningDataModule):
    """Subclasses fill ``self.splits`` (train / validation / test) in ``setup`` and set ``batch_size``,
    ``eval_batch_size``, ``seed``, ``collator`` and ``num_workers``; training order is seeded."""

    splits: dict

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.splits:
            self.setup()
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
