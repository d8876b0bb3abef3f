"""Small statistics for comparing methods over seeds: 95% t-intervals and the paired t-test.

No scipy: the Student t distribution comes from the regularised incomplete beta function.
"""

from __future__ import annotations

import math
from statistics import mean, stdev


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Numerical Recipes, betacf)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
            c = 1.0 + aa / c if abs(1.0 + aa / c) > 1e-300 else 1e-300
            h *= d * c
        if abs(d * c - 1.0) < 1e-12:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom. Example: t = 2.776, df = 4 -> 0.05."""
    return betainc(df / 2, 0.5, df / (df + t * t))


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t (bisection on the p-value). df = 4 -> 2.776."""
    lo, hi = 0.0, 100.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 0.05 else (lo, mid)
    return (lo + hi) / 2


# A spread below this is rounding residue, not variance: accuracies are fractions k/n, so 0.3 - 0.1 and
# 0.5 - 0.3 differ by 1e-17 and would give t ~ 1e16, p = 0.000 for differences that are all the same.
NO_SPREAD = 1e-9
NO_VARIANCE = "all seeds differ by the same amount; no variance to test"
NO_DIFFERENCE = "both methods score the same on every seed; no variance to test"


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width NaN (undefined) for fewer than 2 values or values
    that are all the same (a +-0.0 interval would claim a certainty that 2 equal seeds do not give)."""
    if not xs:
        return math.nan, math.nan
    if len(xs) < 2 or stdev(xs) <= NO_SPREAD:
        return mean(xs), math.nan
    return mean(xs), t_quantile_975(len(xs) - 1) * stdev(xs) / math.sqrt(len(xs))


def paired_t(a: list[float], b: list[float]) -> dict[str, float | str | None]:
    """Paired t-test of a - b (one pair per seed): mean difference, its 95% interval, t and two-sided p.
    Where the test is undefined (one pair, or differences without variance) ci, t and p are NaN and
    `undefined` says why; it is None otherwise."""
    d = [x - y for x, y in zip(a, b)]
    m, half = mean_ci(d)
    if len(d) < 2:
        return {"diff": m, "ci": math.nan, "t": math.nan, "p": math.nan, "n": len(d), "undefined": "one seed"}
    if math.isnan(half):
        why = NO_VARIANCE if abs(m) > NO_SPREAD else NO_DIFFERENCE
        return {"diff": m, "ci": math.nan, "t": math.nan, "p": math.nan, "n": len(d), "undefined": why}
    t = m / (stdev(d) / math.sqrt(len(d)))
    return {"diff": m, "ci": half, "t": t, "p": t_two_sided_p(t, len(d) - 1), "n": len(d), "undefined": None}
