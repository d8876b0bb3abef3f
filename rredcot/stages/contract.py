"""The verifier contract, checked on every call: a plug-in's return value is never trusted as it comes.

    v(completion, sample) -> Score(reward, extractor)    reward: a finite number, or None (undefined)
    v.extract(completion) -> (answer text or None, extractor name)
    v.judge(answer, sample) -> a finite number, or None

None is the contract's "this row cannot be judged" (its gold does not parse): the row is skipped and
counted. Anything else that is not a finite number (a string, NaN, inf) is a bug in the verifier:
taken as a reward it would crash the step (a string), hide itself as skipped rows (NaN) or turn every
advantage into NaN and get blamed on the learning rate (inf), so it is refused at once, naming the
verifier, the call and the completion. So is an exception the verifier raises, and a worker process
it kills on every call (stages/guard.py). All are UserErrors (exit status 2), never a traceback.
`check_golds` holds a verifier that judges its gold to it at start-up (so an all-None judge is refused there).
"""

from __future__ import annotations

import math
import numbers
import signal
from typing import Any

from rredcot.errors import UserError, brief
from rredcot.stages.guard import MAX_DEATHS, VerifierDied, VerifierRaised, summary
from rredcot.types import Sample, Score
from rredcot.ui import note

FIX = (
    "Fix the verifier: judge returns 1.0 / 0.0 (any finite number), or None when a row's gold cannot be "
    "judged; __call__ returns Score(reward, extractor_name); extract returns (answer or None, extractor_name)."
)


class Checked:
    """A verifier (or a Guarded one) whose every call is held to the contract above; same interface."""

    def __init__(self, verifier: Any, name: str):
        self.verifier, self.name = verifier, name

    def __getattr__(self, attr: str) -> Any:  # judges_gold and anything else a plug-in verifier has
        return getattr(self.__dict__["verifier"], attr)

    def _call(self, method: str, args: tuple) -> Any:
        try:
            return getattr(self.verifier, method)(*args)
        except UserError:
            raise
        except VerifierRaised as e:
            raise UserError(self._raised(method, e.summary, args[0])) from None
        except VerifierDied as e:
            raise UserError(self._died(e.status)) from None
        except Exception as e:  # run in this process (verify.timeout_s=0)
            raise UserError(self._raised(method, summary(e), args[0])) from None

    def __call__(self, completion: str, sample: Any) -> Score:
        out = self._call("__call__", (completion, sample))
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], str)):
            raise UserError(self._wrong("__call__", out, "a Score(reward, extractor)", completion))
        return Score(self._reward("__call__", out[0], completion), out[1])

    def extract(self, completion: str) -> tuple[str | None, str]:
        out = self._call("extract", (completion,))
        ok = isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], str)
        if not ok or not (out[0] is None or isinstance(out[0], str)):
            raise UserError(self._wrong("extract", out, "(answer text or None, extractor name)", completion))
        return out

    def judge(self, answer: str | None, sample: Any) -> float | None:
        return self._reward("judge", self._call("judge", (answer, sample)), answer)

    def _reward(self, method: str, value: Any, shown: Any) -> float | None:
        if value is None:
            return None
        if not isinstance(value, numbers.Real):
            raise UserError(self._wrong(method, value, "a reward: a finite number, or None", shown))
        if not math.isfinite(value):
            raise UserError(
                f"The verifier {self.name!r} returned the reward {value} from {method} (for {brief(shown, 60)}), "
                "which is not a finite number: it is a bug in the verifier (0/0, log(0), a missing case), and "
                "as a reward it would make every advantage of its group NaN. Return None where a row cannot be "
                f"judged (it is then skipped and counted), a number otherwise. {FIX}"
            )
        return float(value)

    def _wrong(self, method: str, value: Any, want: str, shown: Any) -> str:
        return (
            f"The verifier {self.name!r} returned {brief(value, 60)} (a {type(value).__name__}) from {method} "
            f"for {brief(shown, 60)}, where {want} is expected. {FIX}"
        )

    def _raised(self, method: str, what: str, shown: Any) -> str:
        return (
            f"The verifier {self.name!r} raised in {method} on {brief(shown, 60)}: {what}. A verifier runs on "
            "whatever the model writes, so it must not raise on odd text: return 0.0 for a completion it "
            f"cannot read (or None for a row whose gold cannot be judged). {FIX}"
        )

    def _died(self, status: int | None) -> str:
        if status is not None and status < 0:
            cause = f"it was killed by {_signal_name(-status)}"
            cause += " (often the out-of-memory killer)" if -status == signal.SIGKILL else ""
            cause += " (a crash in a C extension)" if -status == signal.SIGSEGV else ""
        else:
            cause = f"it exited with status {status} (os._exit or sys.exit in the verifier?)"
        return (
            f"The verifier {self.name!r} ended its worker process on {MAX_DEATHS} calls in a row: {cause}. "
            "Verifier calls run in a worker process under verify.timeout_s, so one crash scores its completion 0 "
            "(counted as extractor/crashed), but a verifier that never returns scores nothing. Make it return a "
            "Score instead of exiting (call it by hand on a few completions to see where it stops)."
        )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def check_golds(sets: dict[str, list[Sample]], verifier: Any, max_bad: float, n: int = 200) -> None:
    """The verifier must judge each row's own gold answer right. When it cannot (a gold format it does
    not read, the wrong verifier for the task), every reward is 0 or undefined and a run trains on
    nothing while looking healthy. Checked on the first `n` rows of each split; refused above `max_bad`.
    Then every verifier is tried on a few rows (try_calls), so a broken plug-in is refused before a run
    directory is written."""
    verifier = verifier if isinstance(verifier, Checked) else Checked(verifier, type(verifier).__name__)
    if getattr(verifier, "judges_gold", True):
        _judge_golds(sets, verifier, max_bad, n)
    try_calls(sets, verifier)


def _judge_golds(sets: dict[str, list[Sample]], verifier: Checked, max_bad: float, n: int) -> None:
    for split, samples in sets.items():
        rows = samples[:n]
        judged = [(s.meta.get("row", i), s.gold, verifier.judge(s.gold, s)) for i, s in enumerate(rows)]
        failed = [(row, gold, r) for row, gold, r in judged if r != 1.0]
        bad = [row for row, _, _ in failed]
        if not bad:
            continue
        if len(bad) > max_bad * len(rows):
            _, gold, r = failed[0]
            raise UserError(
                f"The {split} split's gold answers do not pass the verifier's own check for {len(bad)} of the "
                f"first {len(rows)} rows (rows {bad[:8]}; e.g. gold {brief(gold, 60)} judged {r}), so their "
                "rewards would be 0 or undefined. Check that verify.name fits the task and that "
                "task.answer_format extracts the answer the verifier reads."
            )
        note(
            f"the {split} split has {len(bad)} row(s) among its first {len(rows)} whose gold the verifier cannot "
            f"judge (rows {bad[:8]}); they can never be rewarded."
        )


def try_calls(sets: dict[str, list[Sample]], verifier: Checked, n: int = 8) -> None:
    """Score an empty completion and one that is just the gold on the first `n` rows of each split: a verifier
    that breaks its contract (Checked) fails here, and one whose reward is undefined for all of them is refused
    (it would train a whole run on nothing)."""
    rewards = [verifier(text, s).reward for rows in sets.values() for s in rows[:n] for text in ("", s.gold)]
    if rewards and all(r is None for r in rewards):
        raise UserError(
            f"The verifier {verifier.name!r} scores every completion tried at start-up as undefined (None: an empty "
            f"one and the gold answer itself, on the first {n} rows of each split), so a run would learn from "
            "nothing. None means a row's gold cannot be judged: check that verify.name fits the task and that "
            f"its gold answers are in the form the verifier reads. {FIX}"
        )
