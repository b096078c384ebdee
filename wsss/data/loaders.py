"""The one DataLoader recipe of every stage: seeded shuffling, ``base.num_workers`` workers."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from wsss.config import Params


def loader(ds: Dataset, batch_size: int, params: Params, shuffle: bool, seed: int = 0,
           drop_last: bool = False) -> DataLoader:
    """A DataLoader seeded for reproducible shuffling."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    workers = params.base.num_workers
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last and len(ds) > batch_size,
        num_workers=workers, generator=gen, persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
