"""Paired statistics and corrections against values computed by hand (in the comments)."""

from __future__ import annotations

import itertools
import math
import warnings
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from ablate.stats import (
    benjamini_hochberg,
    holm,
    mcnemar_exact,
    paired_bootstrap,
    paired_delta,
    paired_test,
    sign_flip_exact,
    spearman,
)


def docs(values: list[float], keys: list[int] | None = None) -> pd.Series:
    keys = list(range(len(values))) if keys is None else keys
    return pd.Series(values, index=pd.Index(keys, name="doc_id"), dtype=float)


def test_paired_delta_binary_by_hand():
    base = docs([1, 1, 1, 0, 1, 0])
    # Same documents in another order: doc 5, 4, ..., 0 scored 1, 1, 0, 0, 1, 0 when ablated.
    ablated = docs([1, 1, 0, 0, 1, 0], keys=[5, 4, 3, 2, 1, 0])
    # d = ablated − base per doc 0..5 = [-1, 0, -1, 0, 0, 1]; mean = -1/6.
    # Σd² = 3, SS = 3 − 6·(1/6)² = 17/6, var = 17/30, se = √(17/30)/√6 = 0.307318.
    # Discordant: b (1→0) = docs 0, 2 = 2; c (0→1) = doc 5 = 1; p = 2·P(X ≤ 1; 3, ½) = 2·4/8 = 1.
    result = paired_delta(base, ablated)
    se = math.sqrt(17 / 30) / math.sqrt(6)
    assert result["delta"] == pytest.approx(-1 / 6)
    assert result["stderr"] == pytest.approx(se) == pytest.approx(0.307318, abs=1e-6)
    assert result["ci_low"] == pytest.approx(-1 / 6 - 1.96 * se)
    assert result["ci_high"] == pytest.approx(-1 / 6 + 1.96 * se)
    assert (result["n"], result["p_value"], result["test"]) == (6, 1.0, "mcnemar_exact")


def test_mcnemar_exact():
    # b = 5, c = 0: p = 2·P(X ≤ 0; 5, ½) = 2/32 = 0.0625 (3 concordant docs do not count).
    base = docs([1, 1, 1, 1, 1, 1, 0, 0])
    ablated = docs([0, 0, 0, 0, 0, 1, 0, 0])
    assert paired_delta(base, ablated)["p_value"] == pytest.approx(0.0625)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(1, 1) == 1.0  # 2·P(X ≤ 1; 2, ½) = 1.5, capped
    assert mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 0.109375
    assert mcnemar_exact(9, 1) == pytest.approx(22 / 1024)  # 2·(1 + 10)/1024 = 0.021484375


def test_paired_test_significant_where_unpaired_is_not():
    # Documents differ a lot in difficulty, the ablation costs each about 0.1.
    base = docs([0.0, 0.25, 0.5, 0.75, 1.0] * 3)
    ablated = docs([-0.1, 0.13, 0.42, 0.65, 0.9] * 3)
    # Paired: d = [-0.1, -0.12, -0.08, -0.1, -0.1] x 3, Δ = -0.1, SS = 3 x 0.0008, var =
    # 0.0024/14, se = √(var/15) = 0.00338, z = -29.6.
    paired = paired_delta(base, ablated)
    se = math.sqrt(0.0024 / 14 / 15)
    assert paired["test"] == "paired_normal"
    assert paired["delta"] == pytest.approx(-0.1)
    assert paired["stderr"] == pytest.approx(se)
    assert paired["p_value"] == pytest.approx(math.erfc(0.1 / se / math.sqrt(2)))
    assert paired["p_value"] < 0.05 and paired["ci_high"] < 0
    # Unpaired two-sample z: var(base) = 1.875/14, var(ablated) = 1.9074/14: se = 0.1420,
    # z = -0.704, p = 0.48.
    unpaired_se = math.sqrt((base.var() + ablated.var()) / 15)
    assert unpaired_se == pytest.approx(math.sqrt((1.875 + 1.9074) / 14 / 15), abs=1e-5)
    unpaired_p = math.erfc(abs(ablated.mean() - base.mean()) / unpaired_se / math.sqrt(2))
    assert unpaired_p > 0.05
    # The first five documents alone: tested exactly, every difference negative, so only the
    # all-negative and all-positive of the 32 sign assignments are as extreme: p = 2/32.
    few = paired_delta(docs([0.0, 0.25, 0.5, 0.75, 1.0]), docs([-0.1, 0.13, 0.42, 0.65, 0.9]))
    assert (few["test"], few["p_value"]) == ("sign_flip_exact", pytest.approx(2 / 32))


def test_paired_delta_edge_cases():
    same = paired_delta(docs([0.2, 0.7, 0.4]), docs([0.2, 0.7, 0.4]))
    assert (same["delta"], same["stderr"], same["p_value"]) == (0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"missing from ablated \[3\], missing from base \[7\]"):
        paired_delta(docs([1, 0, 1, 1]), docs([1, 0, 1, 0], keys=[0, 1, 2, 7]))
    with pytest.raises(ValueError, match="duplicate document keys"):
        paired_delta(docs([1, 0], keys=[0, 0]), docs([1, 0], keys=[0, 0]))


def pairs(values: list[tuple[float, int]]) -> pd.Series:
    return pd.Series(values, index=pd.Index(range(len(values)), name="doc_id"), dtype=object)


def test_corpus_perplexity_delta_is_lm_evals_and_resampled_in_pairs():
    # (log-likelihood, words) per document, as lm-eval's word_perplexity logs them.
    base = pairs([(-20.0, 10), (-45.0, 15), (-10.0, 5), (-30.0, 10)])
    ablated = pairs([(-25.0, 10), (-54.0, 15), (-12.0, 5), (-36.0, 10)])
    # exp(105/40) = 13.7909..., exp(127/40) = 23.9144...: Δ = +10.1235 (lm-eval's corpus values,
    # not a mean of per-document perplexities).
    result = paired_test(base, ablated, "weighted_perplexity")
    assert result["delta"] == pytest.approx(math.exp(127 / 40) - math.exp(105 / 40))
    # Four documents: the exact sign-flip test, whose floor is 2/16.
    assert (result["test"], result["p_value"]) == ("sign_flip_exact", pytest.approx(2 / 16))
    # Sixteen: resampled. Every document is worse ablated, so every resample is: p at its
    # floor, the CI above 0.
    many = paired_test(pairs(base.tolist() * 4), pairs(ablated.tolist() * 4), "weighted_perplexity")
    assert many["test"] == "paired_bootstrap" and many["delta"] == pytest.approx(result["delta"])
    assert many["p_value"] == pytest.approx(1 / 2000) and many["ci_low"] > 0
    bits = paired_test(base, ablated, "bits_per_byte")
    assert bits["delta"] == pytest.approx((127 - 105) / 40 / math.log(2))
    # An unchanged model: Δ 0 and p 1. Opposite changes that cancel: not significant.
    assert paired_test(base, base, "weighted_perplexity")["p_value"] == 1.0
    mixed = pairs([(-25.0, 10), (-40.0, 15), (-12.0, 5), (-28.0, 10)])
    assert paired_test(base, mixed, "weighted_perplexity")["p_value"] > 0.05
    with pytest.raises(ValueError, match="no paired test of aggregation 'f1'"):
        paired_test(base, ablated, "f1")


def test_holm_and_benjamini_hochberg_by_hand():
    p = [0.01, math.nan, 0.04, 0.03, 0.005]
    # m = 4 (NaN excluded); sorted 0.005, 0.01, 0.03, 0.04.
    # Holm: 4·0.005 = 0.02, 3·0.01 = 0.03, 2·0.03 = 0.06, max(1·0.04, 0.06) = 0.06.
    np.testing.assert_allclose(holm(p), [0.03, math.nan, 0.06, 0.06, 0.02])
    # BH: 0.005·4/1 = 0.02, 0.01·4/2 = 0.02, 0.03·4/3 = 0.04, 0.04·4/4 = 0.04 (already monotone).
    np.testing.assert_allclose(benjamini_hochberg(p), [0.02, math.nan, 0.04, 0.04, 0.02])
    # Capped at 1; BH: 0.5·2 = 1, then min(1, 0.6·2/2) = 0.6 for both.
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])
    np.testing.assert_allclose(benjamini_hochberg([0.5, 0.6]), [0.6, 0.6])
    assert holm([]).shape == benjamini_hochberg([]).shape == (0,)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([1.5])


def test_spearman():
    # Ranks of y = [5, 6, 7, 8, 7]: [1, 2, 3.5, 5, 3.5]; centred x ranks [-2, -1, 0, 1, 2],
    # centred y ranks [-2, -1, .5, 2, .5]: ρ = 8 / √(10·9.5) = 0.820783.
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3, math.nan], [3, 2, 1, 0]) == pytest.approx(-1.0)  # NaN pair dropped
    # Wikipedia's IQ vs hours of TV (no ties): Σd² = 194, ρ = 1 − 6·194/(10·99) = −29/165.
    iq = [106, 100, 86, 101, 99, 103, 97, 113, 112, 110]
    tv = [7, 27, 2, 50, 28, 29, 20, 12, 6, 17]
    assert spearman(iq, tv) == pytest.approx(-29 / 165)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConstantInputWarning from scipy: NaN is returned first
        assert math.isnan(spearman([1, 2], [2, 1]))
        assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
        assert math.isnan(spearman([1, 2, 3, 4], [2, 2, 2, math.nan]))
        assert math.isnan(spearman([math.nan] * 4, [1, 2, 3, 4]))


def test_library_backed_functions_match_reference_formulas():
    """scipy against the definitions, written independently of the module, on random inputs."""
    rng = np.random.default_rng(0)
    for b, c in rng.integers(0, 300, size=(50, 2)).tolist():
        n = b + c  # exact: min(1, 2·Σ_{k ≤ min(b, c)} C(n, k) / 2ⁿ)
        tail = Fraction(sum(math.comb(n, k) for k in range(min(b, c) + 1)), 2**n)
        assert mcnemar_exact(b, c) == pytest.approx(float(min(1, 2 * tail)), rel=1e-12)
    for _ in range(20):
        base = docs(rng.normal(size=int(rng.integers(2, 200))).tolist())
        ablated = base + rng.normal(-0.05, 0.3, size=len(base))
        d = ablated - base  # two-sided normal p of z = mean/se
        z = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
        expected = math.erfc(abs(z) / math.sqrt(2))
        assert paired_delta(base, ablated)["p_value"] == pytest.approx(expected, rel=1e-12)
    for m in (1, 2, 7, 40):
        p = rng.uniform(size=m) ** 3
        p[-1:] = p[:1]  # a tie
        p[rng.uniform(size=m) < 0.2] = math.nan
        valid = np.flatnonzero(~np.isnan(p))
        ranked = valid[np.argsort(p[valid])]
        # k valid p-values; the i-th smallest (1-based) gets, capped at 1,
        # BH: min over j ≥ i of k·p_(j)/j; Holm: max over j ≤ i of (k − j + 1)·p_(j).
        k = len(ranked)
        bh, hm = np.full(m, math.nan), np.full(m, math.nan)
        for i, doc in enumerate(ranked):
            bh[doc] = min(1, min(k * p[ranked[j]] / (j + 1) for j in range(i, k)))
            hm[doc] = min(1, max((k - j) * p[ranked[j]] for j in range(i + 1)))
        np.testing.assert_allclose(benjamini_hochberg(p), bh, rtol=1e-12)
        np.testing.assert_allclose(holm(p), hm, rtol=1e-12)
    for n in (3, 10, 100):
        x, y = rng.normal(size=n), rng.normal(size=n)
        rx, ry = x.argsort().argsort(), y.argsort().argsort()  # no ties: 1 − 6Σd²/(n(n²−1))
        assert spearman(x, y) == pytest.approx(1 - 6 * ((rx - ry) ** 2).sum() / (n * (n**2 - 1)))
        xt, yt = (2 * x).round(), (2 * y).round()  # ties: Pearson correlation of average ranks
        ranks = pd.DataFrame({"x": xt, "y": yt}).rank()
        expected = np.corrcoef(ranks["x"], ranks["y"])[0, 1]
        assert spearman(xt, yt) == pytest.approx(expected, rel=1e-12)


def test_three_documents_are_tested_exactly_and_never_significant():
    """A bootstrap of three documents reports p = 1/draws; the exact sign-flip test has eight
    assignments, so its smallest two-sided p is 2/8."""
    base = np.array([[-10.0, 5], [-12.0, 6], [-9.0, 4]])
    ablated = base + np.array([[-3.0, 0], [-4.0, 0], [-5.0, 0]])
    result = paired_bootstrap(base, ablated, "weighted_perplexity")
    assert result["test"] == "sign_flip_exact" and result["n"] == 3
    assert result["p_value"] == pytest.approx(0.25)
    mean = paired_delta(pd.Series([0.9, 0.8, 0.7]), pd.Series([0.1, 0.2, 0.3]))
    assert (mean["test"], mean["p_value"]) == ("sign_flip_exact", pytest.approx(0.25))


def test_the_sign_flip_test_counts_assignments_as_extreme_as_observed():
    """Differences 1, 2, 3, -1 of a mean (|Σ d| = 5 observed): of the 16 sign assignments,
    6 have |Σ ±d| ≥ 5 (sums ±7, ±5, ±5)."""
    base = np.zeros(4)
    ablated = np.array([1.0, 2.0, 3.0, -1.0])
    sums = [abs(sum(s * d for s, d in zip(signs, ablated, strict=True)))
            for signs in itertools.product((1, -1), repeat=4)]  # fmt: skip
    expected = sum(total >= 5 for total in sums) / 16
    assert sign_flip_exact(base, ablated, np.mean) == pytest.approx(expected)
    assert expected == pytest.approx(6 / 16)
