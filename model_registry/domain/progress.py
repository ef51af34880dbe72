"""How far a training got and how its metrics went, epoch by epoch: pure values read from its event files."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, TypedDict

Series = tuple[tuple[int, float], ...]  # (epoch index from 0, value), by epoch
TRAIN, VALIDATION = "train", "validation"  # the runs Keras' TensorBoard layout writes


class ProgressView(TypedDict):
    epoch: int  # epochs done
    planned: int | None  # epochs the trainer set out to run; None when it did not say
    loss: float | None  # the last epoch's training loss


@dataclass(frozen=True)
class TrainingCurves:
    """Per-epoch values of a training's metrics by run (`train`, `validation`), and the planned epoch count."""

    runs: Mapping[str, Mapping[str, Series]] = field(default_factory=dict)
    planned_epochs: int | None = None

    @property
    def epochs_done(self) -> int:
        """Epochs with a logged value: the training run's if it has any (it is written first), else any run's."""
        run = self.runs.get(TRAIN) or next((r for r in self.runs.values() if r), {})
        return max((series[-1][0] + 1 for series in run.values() if series), default=0)

    def metrics(self) -> list[str]:
        """Every metric logged in any run, sorted, `loss` first."""
        found = {name for run in self.runs.values() for name, series in run.items() if series}
        return sorted(found, key=lambda name: (name != "loss", name))

    def last(self, run: str, metric: str) -> float | None:
        series = self.runs.get(run, {}).get(metric) or ()
        return series[-1][1] if series else None

    def progress(self) -> ProgressView | None:
        """What a running training's message shows; None when the files say nothing yet."""
        done = self.epochs_done
        if not done and self.planned_epochs is None:
            return None
        return {"epoch": done, "planned": self.planned_epochs, "loss": self.last(TRAIN, "loss")}
