"""Collapse watch: say early, once, when a run looks like it is collapsing, and show the signals.

A collapse (docs/results.md) is a run whose training reward falls from where it had climbed to and does
not come back. In the collapses we logged (issue 11) the first sign was length: completions grew and
more of them ran into rollout.max_new_tokens (the truncated fraction went from under 1% to 5% about 10
steps before the reward fell, then past 50%), unclosed traces scored 0, and the reward followed. The
watch keeps `window`-step moving averages and warns, once each:
- when the truncated fraction (`completion/clipped_ratio`) reaches `clip` and 3x its lowest average so
  far (a run that always truncates some traces is not flagged);
- when the reward is `drop` or more below its best average.
Each warning names the other signals then and now. It only warns (metrics columns `watch/*`): stopping
is the user's call, and the checkpoints before the best step are the ones to go back to.
"""

from __future__ import annotations

from collections import deque
from typing import Any

SIGNALS = ("completion/clipped_ratio", "completion/mean_length", "value/end_mean", "entropy", "advantage/token_mean")


class CollapseWatch:
    def __init__(self, drop: float = 0.2, window: int = 10, clip: float = 0.05):
        self.drop, self.window, self.clip = drop, window, clip
        self.recent: dict[str, deque[float]] = {}
        self.best: tuple[float, int, dict[str, float]] | None = None  # (reward average, step, signal averages then)
        self.warned: set[str] = set()
        self.clip_low = float("inf")

    def _averages(self, row: dict[str, Any]) -> dict[str, float]:
        for k in ("reward/mean", *SIGNALS):
            v = row.get(k)
            if isinstance(v, (int, float)) and v == v:
                self.recent.setdefault(k, deque(maxlen=self.window)).append(float(v))
        return {k: sum(q) / len(q) for k, q in self.recent.items() if len(q) == self.window}

    def update(self, step: int, row: dict[str, Any]) -> str | None:
        """Feed one step's metrics (adds watch/* columns); returns a warning the first time a trigger fires."""
        if not self.drop or row.get("reward/mean") is None:
            return None
        avg = self._averages(row)
        if "reward/mean" not in avg:
            return None
        reward = avg["reward/mean"]
        if self.best is None or reward >= self.best[0]:  # the latest step at the best
            self.best = (reward, step, avg)
        row["watch/reward_avg"] = reward
        clip = avg.get("completion/clipped_ratio", 0.0)
        self.clip_low = min(self.clip_low, clip)  # the run's own normal level of truncation
        fired = {"truncation": clip >= max(self.clip, 3 * self.clip_low), "reward": self.best[0] - reward >= self.drop}
        row["watch/truncation"], row["watch/collapse"] = float(fired["truncation"]), float(fired["reward"])
        new = [k for k, on in fired.items() if on and k not in self.warned]
        if not new:
            return None
        self.warned.update(new)
        changes = ", ".join(
            f"{k} {self.best[2][k]:.3g} -> {v:.3g}" for k, v in avg.items() if k in self.best[2] and k != "reward/mean"
        )
        if "reward" not in new:
            return (
                f"step {step}: {clip:.0%} of completions now run into rollout.max_new_tokens ({self.window}-step "
                f"average; {self.clip_low:.1%} at its lowest). In the collapses we logged this "
                f"came first, about 10 steps before the reward fell ({changes})."
            )
        return (
            f"step {step}: the training reward ({self.window}-step average) fell from {self.best[0]:.2f} at step "
            f"{self.best[1]} to {reward:.2f}; the run may be collapsing ({changes}). Checkpoints up to step "
            f"{self.best[1]} are the ones to go back to; see docs/results.md for what collapse looks like."
        )
