"""The collapse watch: one warning when the reward's moving average falls `drop` below its best, naming
the other signals' change; none on a noisy plateau; off at drop=0."""
from rredcot.watch import CollapseWatch


def _feed(watch, rewards, **signals):
    said = []
    for step, r in enumerate(rewards, 1):
        row = {"reward/mean": r, **{k: v(step) for k, v in signals.items()}}
        msg = watch.update(step, row)
        if msg:
            said.append((step, msg, row))
    return said


def test_a_fall_from_the_best_average_is_said_once_with_the_signals():
    # 10 steps at .8, then .5: the 4-step average is .8 until step 10, then (3 x .8 + .5) / 4 = .725 at
    # step 11, .65 at 12 (a fall of .15), .575 at 13 (a fall of .225 >= .2): said at step 13, once
    rewards = [0.8] * 10 + [0.5] * 10
    said = _feed(CollapseWatch(drop=0.2, window=4), rewards, **{"value/end_mean": lambda s: 0.6 if s <= 10 else 0.2})
    assert [s for s, _, _ in said] == [13]
    step, msg, row = said[0]
    assert "fell from 0.80 at step 10 to 0.57" in msg and "value/end_mean 0.6 -> 0.2" in msg and row["watch/collapse"] == 1.0


def test_a_noisy_plateau_and_drop_zero_say_nothing():
    noisy = [0.7, 0.8, 0.75, 0.65, 0.8, 0.7] * 5
    assert _feed(CollapseWatch(drop=0.2, window=4), noisy) == []
    assert _feed(CollapseWatch(drop=0.0, window=4), [0.8] * 10 + [0.0] * 10) == []
