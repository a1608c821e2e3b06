"""Keep track of the best evaluation result (for best-checkpoint selection)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

MODES = ("max", "min")
VALIDATION_SPLIT = "val"  # the name the validation classes (data.val_classes) are reported under


def evaluated_splits(val_classes: float, test_splits: Sequence[str]) -> list[str]:
    """The splits each evaluation reports, in order; the first one picks `best`: "val" (the
    classes data.val_classes holds out of training) when it is set, else the first test split."""
    return ([VALIDATION_SPLIT] if val_classes else []) + list(test_splits)


EMA_PREFIX = "ema/"  # the metrics of the averaged weights (optim.ema_decay): ema/recall@1, ema/val/recall@1


def split_metric(split: str, name: str) -> str:
    """How a split's metric is named in results and records: the "test" split keeps the plain
    name (recall@1), as runs with a single test split always had it; any other split's name
    is prefixed (val/recall@1, test_800/recall@1)."""
    return name if split == "test" else f"{split}/{name}"


@dataclass
class BestTracker:
    """Best value of one metric over evaluations.

    ``update(step, metrics)`` returns True when this evaluation is a new best (strictly
    better; NaN never is). The first evaluation with the metric is always a best.
    ``state_dict``/``load_state_dict`` let the trainer save it with a checkpoint.
    """

    metric: str = "recall@1"
    mode: str = "max"
    best_value: float | None = None
    best_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; valid choices: {', '.join(MODES)}")

    def is_better(self, value: float) -> bool:
        if value is None or math.isnan(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.mode == "max" else value < self.best_value

    def update(self, step: int, metrics: dict[str, Any]) -> bool:
        if self.metric not in metrics:
            raise ValueError(f"metric {self.metric!r} not in the results; available: {', '.join(metrics)}")
        value = float(metrics[self.metric])
        self.history.append({"step": step, **metrics})
        if not self.is_better(value):
            return False
        self.best_value, self.best_step = value, step
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("metric", self.metric) != self.metric or state.get("mode", self.mode) != self.mode:
            raise ValueError(
                f"tracker state is for {state.get('metric')}/{state.get('mode')}, not {self.metric}/{self.mode}"
            )
        self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.history = list(state.get("history", []))

    @classmethod
    def from_history(cls, path: str | os.PathLike, metric: str = "recall@1", mode: str = "max") -> BestTracker:
        """Replay a JSON-lines results history (one ``{"step": ..., <metrics>}`` per line)."""
        tracker = cls(metric=metric, mode=mode)
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        rec = json.loads(line)
                        step = rec.pop("step", len(tracker.history))
                        rec.pop("is_best", None)
                        tracker.update(step, rec)
        return tracker

    def append_to_history(self, path: str | os.PathLike, step: int, metrics: dict[str, Any]) -> bool:
        """``update`` and append the record (with ``is_best``) to a JSON-lines history."""
        is_best = self.update(step, metrics)
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, **metrics, "is_best": is_best}) + "\n")
        return is_best
