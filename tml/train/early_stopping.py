"""Stop when validation loss has not improved by `min_delta` for `patience` validations in a row.

Every rank feeds it the same all-reduced val loss, so every rank takes the same decision; the loop still
broadcasts rank 0's answer so a last-bit difference in a reduction can never split the ranks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class EarlyStopping:
    patience: int  # validations without improvement before stopping; 0 disables
    min_delta: float = 0.0
    best: float = math.inf
    bad_validations: int = 0

    def update(self, val_loss: float) -> bool:
        """Record one validation; True when training should stop."""
        if val_loss < self.best - self.min_delta:
            self.best = val_loss
            self.bad_validations = 0
        else:
            self.bad_validations += 1
        return self.patience > 0 and self.bad_validations >= self.patience

    @property
    def improved(self) -> bool:
        """Whether the latest validation set a new best (the loop then saves `best`)."""
        return self.bad_validations == 0 and math.isfinite(self.best)

    def state_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.best = float(state["best"])
        self.bad_validations = int(state["bad_validations"])
