"""Per-document statistics of an ablation: paired Δ, its test, multiple-comparison corrections.

A metric that is a mean over documents (accuracy, exact match) gets :func:`paired_delta`; one
that lm-eval aggregates over the whole corpus (perplexity: exp of minus the summed
log-likelihood over the summed words or bytes) gets :func:`paired_bootstrap`, which resamples
documents, the same ones for both models. McNemar's exact test, the normal p-value,
Benjamini–Hochberg and Spearman's ρ come from scipy.stats; only Holm is written here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

Z_95 = 1.96  # two-sided 95% quantile of the standard normal
BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 0
# Up to this many documents a paired test enumerates every sign flip (2^n assignments) instead
# of resampling or a normal approximation, which mean nothing on a handful of documents.
EXACT_MAX_DOCUMENTS = 12


def _weighted(log_likelihoods: np.ndarray, counts: np.ndarray) -> float:
    return float(log_likelihoods.sum() / counts.sum())


# lm-eval's aggregations (by registered name) of per-document values whose Δ can be tested
# paired: "mean" per document; the others over the corpus, on (log-likelihood, words or bytes)
# pairs or, for "perplexity", one log-likelihood per document, as lm-eval computes them.
CORPUS_AGGREGATIONS = {
    "weighted_perplexity": lambda pairs: math.exp(-_weighted(pairs[:, 0], pairs[:, 1])),
    "bits_per_byte": lambda pairs: -_weighted(pairs[:, 0], pairs[:, 1]) / math.log(2),
    "perplexity": lambda values: math.exp(-float(values.mean())),
}
PAIRED_AGGREGATIONS = ("mean", *CORPUS_AGGREGATIONS)


def paired_delta(base: pd.Series, ablated: pd.Series) -> dict[str, float | int | str]:
    """Δ = mean(ablated − base) over documents, with its paired stderr, 95% CI and p-value.

    Both series are indexed by document key (e.g. ``(task, doc_id)``) and joined on it; the
    key sets must be equal. The CI is the normal approximation Δ ± 1.96·se, with
    se = std(differences, ddof=1) / √n. The p-value is two-sided: McNemar's exact test
    (binomial on the discordant documents) when every score is 0 or 1, otherwise the normal
    approximation of the paired t statistic Δ/se (fine for the hundreds of documents a task
    has), or up to :data:`EXACT_MAX_DOCUMENTS` documents :func:`sign_flip_exact`, since the
    normal approximation is anticonservative for a handful. ``test`` names which one was used.
    """
    x, y = aligned(base, ablated)
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("NaN scores: every document needs a base and an ablated score")
    n = len(x)
    if n == 0:
        raise ValueError("no documents")
    diff = y - x
    delta = float(diff.mean())
    stderr = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    if np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all():
        b = int(((x == 1) & (y == 0)).sum())
        c = int(((x == 0) & (y == 1)).sum())
        test, p_value = "mcnemar_exact", mcnemar_exact(b, c)
    elif n <= EXACT_MAX_DOCUMENTS:
        test, p_value = "sign_flip_exact", sign_flip_exact(x, y, lambda values: values.mean())
    else:
        test, p_value = "paired_normal", _paired_normal_p(diff, delta, stderr)
    return {
        "delta": delta,
        "stderr": stderr,
        "ci_low": delta - Z_95 * stderr,
        "ci_high": delta + Z_95 * stderr,
        "n": n,
        "p_value": p_value,
        "test": test,
    }


def aligned(base: pd.Series, ablated: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' per-document values in the same document order (rows: one per document; a
    value may be a tuple, e.g. (log-likelihood, words)); ValueError unless the document keys
    are the same, each once."""
    for name, series in (("base", base), ("ablated", ablated)):
        if series.index.has_duplicates:
            duplicated = series.index[series.index.duplicated()].unique().tolist()
            raise ValueError(f"{name}: duplicate document keys {_some(duplicated)}")
    only_base = base.index.difference(ablated.index)
    only_ablated = ablated.index.difference(base.index)
    if len(only_base) or len(only_ablated):
        raise ValueError(
            f"document keys differ: missing from ablated {_some(only_base.tolist())}, "
            f"missing from base {_some(only_ablated.tolist())}"
        )
    x = np.array(base.tolist(), dtype=float)
    return x, np.array(ablated.reindex(base.index).tolist(), dtype=float)


def paired_test(
    base: pd.Series, ablated: pd.Series, aggregation: str = "mean"
) -> dict[str, float | int | str]:
    """The paired Δ and its test for a metric lm-eval aggregates by ``aggregation``
    (:data:`PAIRED_AGGREGATIONS`): :func:`paired_delta` of a mean, else
    :func:`paired_bootstrap`."""
    if aggregation == "mean":
        return paired_delta(base, ablated)
    if aggregation not in CORPUS_AGGREGATIONS:
        raise ValueError(f"no paired test of aggregation {aggregation!r} ({PAIRED_AGGREGATIONS})")
    return paired_bootstrap(*aligned(base, ablated), aggregation)


def paired_bootstrap(
    base: np.ndarray,
    ablated: np.ndarray,
    aggregation: str,
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, float | int | str]:
    """Δ = aggregate(ablated) − aggregate(base) of a corpus-level ``aggregation``
    (:data:`CORPUS_AGGREGATIONS`) over per-document values (rows: the same documents, in the
    same order, on both sides), with a paired bootstrap: ``draws`` resamples of the documents,
    the same indices for both models. stderr is the resampled Δs' standard deviation, the 95% CI
    their 2.5 and 97.5 percentiles, and the two-sided p-value twice the smaller share of
    resampled Δs on either side of 0 (at least 1/draws); up to :data:`EXACT_MAX_DOCUMENTS`
    documents the p-value is :func:`sign_flip_exact`'s instead (a bootstrap of three documents
    reports p = 1/draws)."""
    reduce = CORPUS_AGGREGATIONS[aggregation]
    if base.shape != ablated.shape or not len(base):
        raise ValueError(f"paired values differ in shape: {base.shape} and {ablated.shape}")
    delta = reduce(ablated) - reduce(base)
    rng = np.random.default_rng(seed)
    resampled = np.empty(draws)
    for draw in range(draws):
        rows = rng.integers(0, len(base), len(base))
        resampled[draw] = reduce(ablated[rows]) - reduce(base[rows])
    side = min((resampled <= 0).mean(), (resampled >= 0).mean())
    p_value = 1.0 if delta == 0 else float(min(1.0, max(2 * side, 1 / draws)))
    test = "paired_bootstrap"
    if len(base) <= EXACT_MAX_DOCUMENTS:
        test, p_value = "sign_flip_exact", sign_flip_exact(base, ablated, reduce)
    return {
        "delta": delta,
        "stderr": float(resampled.std(ddof=1)),
        "ci_low": float(np.percentile(resampled, 2.5)),
        "ci_high": float(np.percentile(resampled, 97.5)),
        "n": len(base),
        "p_value": p_value,
        "test": test,
    }


def sign_flip_exact(base: np.ndarray, ablated: np.ndarray, reduce) -> float:
    """Two-sided exact paired permutation p-value of Δ = reduce(ablated) − reduce(base): under
    no effect each document's two values are exchangeable, so every one of the 2^n assignments
    of its values to the sides is equally likely; p is the share of assignments whose |Δ| is at
    least the observed one (the observed assignment included, so p ≥ 2/2^n for Δ ≠ 0)."""
    n = len(base)
    observed = abs(reduce(ablated) - reduce(base))
    if observed == 0:
        return 1.0
    flips = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # one row per assignment
    extreme = 0
    for flip in flips.astype(bool):
        shape = (n,) + (1,) * (base.ndim - 1)
        swap = flip.reshape(shape)
        delta = reduce(np.where(swap, base, ablated)) - reduce(np.where(swap, ablated, base))
        extreme += abs(delta) >= observed * (1 - 1e-12)
    return float(extreme / 2**n)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p = min(1, 2·P(X ≤ min(b, c))), X ~ Binomial(b + c, 1/2)."""
    if b + c == 0:  # no discordant documents: nothing to test (binomtest needs n ≥ 1)
        return 1.0
    return float(stats.binomtest(b, b + c, 0.5).pvalue)


def _paired_normal_p(diff: np.ndarray, delta: float, stderr: float) -> float:
    if not diff.any():
        return 1.0
    if math.isnan(stderr):
        return math.nan
    if stderr == 0:
        return 0.0
    return float(2 * stats.norm.sf(abs(delta / stderr)))


def _some(keys: list, shown: int = 5) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"[{', '.join(map(repr, keys[:shown]))}{more}]" if keys else "[]"


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values; NaN stays NaN and does not count towards m."""
    # scipy has no Holm (statsmodels' multipletests does, not worth a dependency for 5 lines).
    p, valid = _valid(pvalues)
    order = np.argsort(p[valid])
    m = len(order)
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate((m - np.arange(m)) * p[valid][order])
    return _place(p, valid, adjusted)


def benjamini_hochberg(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg (FDR) adjusted p-values; NaN stays NaN and does not count towards m."""
    p, valid = _valid(pvalues)
    # scipy rejects NaN, hence only the valid ones; it also returns [] for no p-values.
    return _place(p, valid, stats.false_discovery_control(p[valid], method="bh"))


def _valid(pvalues: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pvalues, dtype=float)
    valid = ~np.isnan(p)
    if ((p[valid] < 0) | (p[valid] > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    return p, valid


def _place(p: np.ndarray, valid: np.ndarray, adjusted: np.ndarray) -> np.ndarray:
    out = np.full(p.shape, np.nan)
    out[valid] = np.minimum(adjusted, 1.0)
    return out


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's ρ: Pearson correlation of average ranks (ties share their mean rank).

    Pairs with a NaN are dropped; NaN when fewer than 3 pairs remain or either side is constant.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    # Checked here: scipy would give ±1 for 2 pairs and warn (ConstantInputWarning) on constants.
    if len(x) < 3 or np.unique(x).size < 2 or np.unique(y).size < 2:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)
