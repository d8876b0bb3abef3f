"""The collapse watch: a warning when truncation climbs (the first sign in the collapses we logged), one
when the reward's moving average falls `drop` below its best, each once, naming the signals; none on a
noisy plateau or a run that always truncates a little; off at drop=0. Replayed on a logged collapse."""

from rredcot.watch import CollapseWatch


def _feed(watch, rewards, clips=None):
    said = []
    for step, r in enumerate(rewards, 1):
        row = {"reward/mean": r, "completion/clipped_ratio": clips[step - 1] if clips else 0.0}
        msg = watch.update(step, row)
        if msg:
            said.append((step, msg, row))
    return said


def test_a_fall_from_the_best_average_is_said_once():
    # 10 steps at .8, then .5: the 4-step average is .8 until step 10, .725 at 11, .65 at 12, .575 at 13
    # (a fall of .225 >= .2): said at step 13, once
    said = _feed(CollapseWatch(drop=0.2, window=4), [0.8] * 10 + [0.5] * 10)
    assert [s for s, _, _ in said] == [13]
    assert "fell from 0.80 at step 10 to 0.57" in said[0][1] and said[0][2]["watch/collapse"] == 1.0


def test_rising_truncation_is_said_before_the_reward_falls():
    # truncation .01 while the reward is .8; from step 11 it climbs .04 a step
    clips = [0.01] * 10 + [0.01 + 0.04 * i for i in range(1, 11)]
    rewards = [0.8] * 14 + [0.3] * 6
    said = _feed(CollapseWatch(drop=0.2, window=4), rewards, clips)
    # 4-step clip averages: step 11 (.01,.01,.01,.05) = .02; 12 (.01,.01,.05,.09) = .04; 13 = .07 >= .05
    # and >= 3 x .01 (its lowest): said at step 13, while the reward is still .8
    assert [s for s, _, _ in said][0] == 13 and "run into rollout.max_new_tokens" in said[0][1]
    assert any("fell from" in m for _, m, _ in said[1:])  # the reward warning still comes, later


def test_a_noisy_plateau_a_steady_truncation_and_drop_zero_say_nothing():
    assert _feed(CollapseWatch(drop=0.2, window=4), [0.7, 0.8, 0.75, 0.65, 0.8, 0.7] * 5) == []
    assert _feed(CollapseWatch(drop=0.2, window=4), [0.7] * 30, [0.2] * 30) == []  # always 20% truncated
    assert _feed(CollapseWatch(drop=0.0, window=4), [0.8] * 10 + [0.0] * 10) == []


def test_replayed_on_a_logged_collapse_it_warns_before_the_held_out_drop():
    """tests/assets/collapse_hard_fixed_seed0.jsonl: the metrics of a real collapse (+exp=builtin_hard
    segment=fixed seed=0, 100 steps; dev greedy .855 at step 50, .727 at 75, .148 at 100)."""
    import json

    from tests.conftest import ASSETS

    rows = [json.loads(line) for line in (ASSETS / "collapse_hard_fixed_seed0.jsonl").read_text().splitlines()]
    watch, said = CollapseWatch(), []
    for r in rows:
        if "reward/mean" in r and watch.update(r["step"], r):
            said.append(r["step"])
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    assert evals[100] < 0.2 < 0.8 < evals[50]  # it did collapse
    assert said[0] < 75 and said[1] < 100  # truncation first (step 70), before the drop eval at 75 shows
