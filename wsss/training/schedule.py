"""A training schedule in optimiser steps, run as epochs over a data loader.

Compared runs must get the same number of optimiser steps, whatever the size of their training sets:
an epoch-based schedule gives a U-Net on 198 GT masks about 6.6x fewer steps than one on 1,307
pseudo-masks. :class:`StepSchedule` turns a step budget into the epochs the shared loop runs (the last
one cut short), so checkpoints, resume and per-epoch logging stay epoch-based.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wsss.errors import ConfigError


@dataclass(frozen=True)
class StepSchedule:
    """``steps`` optimiser steps over a loader of ``steps_per_epoch`` batches.

    Every epoch but the last runs the whole loader; the last runs the remaining steps, so the total is
    exactly ``steps`` for any training-set size.
    """

    steps: int
    steps_per_epoch: int

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"a step schedule needs at least 1 step, got {self.steps}")
        if self.steps_per_epoch < 1:
            raise ConfigError(f"a step schedule needs a loader with at least 1 batch, got {self.steps_per_epoch}")

    @property
    def epochs(self) -> int:
        """Epochs (passes over the loader, the last possibly partial) that make up ``steps``."""
        return math.ceil(self.steps / self.steps_per_epoch)

    def steps_in(self, epoch: int) -> int:
        """Optimiser steps of ``epoch`` (0-based): a full loader, except the last epoch's remainder."""
        if not 0 <= epoch < self.epochs:
            raise ValueError(f"epoch {epoch} outside the schedule's {self.epochs} epochs")
        return min(self.steps_per_epoch, self.steps - epoch * self.steps_per_epoch)
