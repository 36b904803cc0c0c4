"""Per-sample metrics computed beside lm-eval's own, from the same requests.

``acc_ce`` ("cross-entropy accuracy", figures 3, 4 and 6 of the paper, which never defines it):
the option with the lowest mean per-token cross-entropy, i.e. the highest log-likelihood divided
by its number of continuation tokens, is the prediction. lm-eval's ``acc`` uses the summed
log-likelihood and ``acc_norm`` divides by the option's length in bytes; ``acc_ce`` divides by
tokens, the model's own unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def acc_ce(loglikelihoods: Sequence[float], token_counts: Sequence[int], gold: int) -> float:
    """1.0 if the option with the lowest mean per-token cross-entropy is ``gold``, else 0.0."""
    mean_ce = [-ll / max(n, 1) for ll, n in zip(loglikelihoods, token_counts, strict=True)]
    return float(min(range(len(mean_ce)), key=mean_ce.__getitem__) == gold)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and its standard error (as lm-eval reports for mean-aggregated metrics)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)
