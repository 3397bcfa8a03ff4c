"""Confidence intervals of rates: shared by training's validation plots and the evaluation's win
rates and principle checks, so neither side imports the other. Pure functions, no I/O."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (nan, nan) for n = 0.

    centre = (p + z^2 / 2n) / (1 + z^2 / n),  half = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n).
    8 of 10 gives [0.4902, 0.9433]. Unlike p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and does
    not collapse to a point at 0 or n successes."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # exact at the ends (0 of n: low is 0; n of n: high is 1), where rounding would miss them
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))
