"""Paired comparisons over seeds: the mean difference, its t confidence interval, a verdict.

Every variant of a sweep runs the same seeds, and a seed fixes the data order (and the
initialisation's random stream), so the seed-to-seed noise a variant shares with another
cancels in their difference. A claim "a < b" is judged on d_s = value_a(s) - value_b(s):

    mean d ± t_{0.975, n-1} * sd(d) / sqrt(n)

"holds" when the whole interval is below 0, "reversed" when it is above 0, "undecided"
when it contains 0 (or fewer than 2 seeds finished for both).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

HOLDS, REVERSED, UNDECIDED = "holds", "reversed", "undecided"
CONFIDENCE = 0.95


def t_pdf(x: float, df: int) -> float:
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(c - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int, intervals: int = 4000) -> float:
    """P(T <= x) for Student's t with `df` degrees of freedom (Simpson's rule from 0; symmetric)."""
    if x < 0:
        return 1 - t_cdf(-x, df, intervals)
    h = x / intervals
    inner = sum((4 if i % 2 else 2) * t_pdf(i * h, df) for i in range(1, intervals))
    return 0.5 + h / 3 * (t_pdf(0, df) + inner + t_pdf(x, df))


def t_quantile(p: float, df: int) -> float:
    """The x with t_cdf(x, df) = p, for 0.5 <= p < 1 (bisection)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Paired:
    """The paired difference a - b over the seeds both finished."""
    n: int
    mean: float
    lo: float
    hi: float

    @property
    def verdict(self) -> str:
        """Of the claim a < b."""
        if self.n < 2 or math.isnan(self.lo):
            return UNDECIDED
        return HOLDS if self.hi < 0 else REVERSED if self.lo > 0 else UNDECIDED


def paired_difference(a: dict[int, float], b: dict[int, float]) -> Paired:
    """`a`, `b`: seed -> value (missing or non-finite values leave that seed out)."""
    d = [a[s] - b[s] for s in a if s in b and a[s] is not None and b[s] is not None
         and math.isfinite(a[s]) and math.isfinite(b[s])]
    if not d:
        return Paired(0, math.nan, math.nan, math.nan)
    mean = statistics.mean(d)
    if len(d) < 2:
        return Paired(1, mean, math.nan, math.nan)
    half = t_quantile(0.5 + CONFIDENCE / 2, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return Paired(len(d), mean, mean - half, mean + half)


def overall(verdicts: list[str]) -> str:
    """A chain a < b < c: holds when every link holds, reversed when any link is reversed."""
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return REVERSED if REVERSED in verdicts else UNDECIDED
