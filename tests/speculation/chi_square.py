"""Pearson's chi-square goodness-of-fit without requiring scipy.

Cells with an expected count under 5 are pooled into one (the usual validity rule). The
critical value is scipy's exact quantile when scipy is installed, else the Wilson–Hilferty
approximation chi2_q(df) ≈ df·(1 − 2/(9df) + z·sqrt(2/(9df)))³, which is within 1 % of the
exact value for df ≥ 3 at these tail probabilities. Tests use a 0.1 % false-alarm level
(z = 3.0902) with fixed seeds, so a pass is reproducible and a broken sampler, whose
statistic grows with the number of draws, fails by a wide margin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z_999 = 3.0902  # standard normal 99.9 % quantile


def chi_square(observed: Sequence[float], expected: Sequence[float], min_expected: float = 5.0
               ) -> tuple[float, int]:
    """(statistic, degrees of freedom) after pooling small cells; expected must sum to the draws."""
    obs_cells, exp_cells = [], []
    pooled_obs = pooled_exp = 0.0
    for o, e in zip(observed, expected, strict=True):
        if e < min_expected:
            pooled_obs, pooled_exp = pooled_obs + o, pooled_exp + e
        else:
            obs_cells.append(o)
            exp_cells.append(e)
    if pooled_exp > 0 or pooled_obs > 0:
        obs_cells.append(pooled_obs)
        exp_cells.append(max(pooled_exp, 1e-12))
    stat = sum((o - e) ** 2 / e for o, e in zip(obs_cells, exp_cells, strict=True))
    return stat, len(obs_cells) - 1


def critical_value(df: int, z: float = Z_999) -> float:
    try:
        from scipy.stats import chi2  # type: ignore[import-not-found]

        return float(chi2.ppf(0.999 if z == Z_999 else 0.5 * (1 + math.erf(z / math.sqrt(2))), df))
    except ImportError:
        h = 2.0 / (9.0 * df)
        return df * (1 - h + z * math.sqrt(h)) ** 3
