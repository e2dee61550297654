"""Welch's t-test over seeds: is one row's mean ahead of another's beyond seed noise?"""

from __future__ import annotations

import math

# Two-sided 5% critical values of Student's t for 1..30 degrees of freedom (the standard table).
T_CRIT_05 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t_critical(df: float) -> float:
    """The two-sided 5% critical t for ``df`` degrees of freedom rounded down, and the value of 30
    beyond the table (both conservative: the critical value falls as df grows)."""
    return T_CRIT_05[min(max(int(df), 1), len(T_CRIT_05)) - 1]


def welch(a: dict[str, float], n_a: int, b: dict[str, float], n_b: int) -> tuple[float, float]:
    """Welch's t of mean a - mean b (``{"mean", "std"}`` with sample std over n seeds) and its
    Welch-Satterthwaite degrees of freedom. Zero spread on both sides: t is +-inf (or 0 when equal)."""
    _, t, df = welch_contrast([(1.0, a, n_a), (-1.0, b, n_b)])
    return t, df


def reading(t: float, df: float) -> str:
    """ "ahead" / "behind" when Welch's test rejects equal means at 5% (two-sided), else "level"."""
    crit = t_critical(df)
    return "ahead" if t > crit else "behind" if t < -crit else "level"


def welch_contrast(groups: list[tuple[float, dict[str, float], int]]) -> tuple[float, float, float]:
    """Welch's t of a linear contrast of independent means, sum of c * mean over ``groups`` of
    ``(c, {"mean", "std"}, n)`` (sample std over n seeds): the contrast, its t (the contrast over
    the square root of sum c^2 std^2 / n) and the Welch-Satterthwaite degrees of freedom
    generalised to k groups, (sum v)^2 / sum v^2 / (n - 1) with v = c^2 std^2 / n. With
    coefficients +1, -1 on two groups it is :func:`welch`. Zero spread everywhere: t is +-inf
    (or 0 when the contrast is 0) and df the pooled sum of (n - 1)."""
    est = sum(c * g["mean"] for c, g, _ in groups)
    vs = [(c * c * g["std"] ** 2 / n, n) for c, g, n in groups]
    var = sum(v for v, _ in vs)
    pooled = float(sum(n - 1 for _, n in vs))
    if var == 0:
        return est, (math.copysign(math.inf, est) if est else 0.0), pooled
    den = sum(v**2 / (n - 1) for v, n in vs if n > 1)
    return est, est / math.sqrt(var), (var**2 / den if den else pooled)
