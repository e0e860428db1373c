"""The loader half that every qaft DataModule shares: prepared splits in, seeded DataLoaders out."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader


class SplitDataModule(pl.LightningDataModule):
    """Subclasses fill ``self.splits`` (train / validation / test) in ``setup`` and set ``batch_size``,
    ``eval_batch_size``, ``seed``, ``collator`` and ``num_workers``; training order is seeded.

    ``data_sha256``: ``{path: sha256}`` of every local file ``setup`` parsed, hashed from the very bytes parsed
    (:mod:`qaft.data.local`); empty before ``setup`` and for built-in and hub data. A generated training set's
    cache file is not listed: that data is named by its generation settings, which the run identity holds.
    """

    splits: dict

    def __init__(self) -> None:
        super().__init__()
        self.data_sha256: dict[str, str] = {}

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
