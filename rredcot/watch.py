"""Collapse watch: say early, once, when a run looks like it is collapsing, and show the signals.

A collapse (README, Results) is a run whose training reward falls from where it had climbed to and
does not come back: in ours, the reward's moving average fell for tens of steps before held-out
accuracy did, while the completions grew blank lines before the end-of-thinking marker and the
values at the end of the thinking part (`value/end_mean`) fell with the reward. The watch keeps a
moving average of `reward/mean` over `window` steps and warns when it is `drop` or more below its best
(after `window` steps), naming the other signals' change over the same span. It only warns (a metrics
column `watch/collapse` turns 1 and one line is said): stopping is the user's call, and the last
checkpoints are the ones to go back to.
"""
from __future__ import annotations

from collections import deque
from typing import Any

SIGNALS = ("value/end_mean", "completion/mean_length", "entropy", "advantage/mass_all_right")


class CollapseWatch:
    def __init__(self, drop: float = 0.2, window: int = 10):
        self.drop, self.window = drop, window
        self.recent: deque[float] = deque(maxlen=window)
        self.best: tuple[float, int, dict[str, float]] | None = None  # (moving average, step, signals then)
        self.warned = False

    def update(self, step: int, row: dict[str, Any]) -> str | None:
        """Feed one step's metrics; returns the warning the first time the reward has fallen `drop` below its best."""
        if not self.drop or row.get("reward/mean") is None or row["reward/mean"] != row["reward/mean"]:
            return None
        self.recent.append(float(row["reward/mean"]))
        if len(self.recent) < self.window:
            return None
        avg = sum(self.recent) / len(self.recent)
        signals = {k: float(row[k]) for k in SIGNALS if isinstance(row.get(k), (int, float))}
        if self.best is None or avg >= self.best[0]:  # the latest step at the best
            self.best = (avg, step, signals)
        row["watch/reward_avg"] = avg
        falling = self.best[0] - avg >= self.drop
        row["watch/collapse"] = float(falling)
        if not falling or self.warned:
            return None
        self.warned = True
        changes = ", ".join(f"{k} {self.best[2][k]:.3g} -> {v:.3g}" for k, v in signals.items() if k in self.best[2])
        return (f"step {step}: the training reward ({self.window}-step average) fell from {self.best[0]:.2f} at step "
                f"{self.best[1]} to {avg:.2f}; the run may be collapsing ({changes}). Checkpoints up to step "
                f"{self.best[1]} are the ones to go back to; see README, Results, for what collapse looks like.")
