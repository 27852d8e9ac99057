"""Honest uncertainty: percentile bootstrap CIs and a paired test for Baseline vs Fine-Tuned."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float], samples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(samples, x.size))
    means = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired_permutation_p(diffs: Sequence[float], samples: int = 20000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation test of mean(diffs) == 0; exact for n <= 16."""
    d = np.asarray(diffs, dtype=float)
    d = d[d != 0]
    n = d.size
    if n == 0:
        return 1.0
    observed = abs(d.mean())
    if n <= 16:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2 - 1
    else:
        signs = np.random.default_rng(seed).choice([-1, 1], size=(samples, n))
    means = np.abs((signs * d).mean(axis=1))
    return float((means >= observed - 1e-12).mean())


@dataclass
class Paired:
    n: int
    mean_diff: float
    ci: tuple[float, float]
    p_value: float
    wins: int
    ties: int
    losses: int


def paired_compare(base: Sequence[float], tuned: Sequence[float], samples: int = 2000, seed: int = 0, tie_eps: float = 1e-9) -> Paired:
    b, t = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    d = t - b
    return Paired(
        n=int(d.size),
        mean_diff=float(d.mean()) if d.size else float("nan"),
        ci=bootstrap_ci(d, samples, seed),
        p_value=paired_permutation_p(d, seed=seed),
        wins=int((d > tie_eps).sum()),
        ties=int((np.abs(d) <= tie_eps).sum()),
        losses=int((d < -tie_eps).sum()),
    )
