"""Claims as predicates over figure CSVs: verdicts on hand-made frames, and the YAML's validity."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest
import yaml

from ablate.aggregate import COLUMNS
from ablate.claims import check_claims, claim_figures, depth_layers, load_claims, parse_claim
from ablate.config import figure_runs
from conftest import REPO

SHIPPED = REPO / "workflow/config/claims.yaml"
PAPER_HEADS = "paper semantics: head h silences its KV group"

KV_FIRST = {
    "id": "kv_first",
    "figure": "fig5",
    "model": "llama31_8b",
    "text": "first layers cost up to 0.8",
    "paper_value": -0.8,
    "predicate": {"metric": "acc", "layers": [0, 1], "statistic": "min", "op": "between",
                  "value": [-0.9, -0.7]},
}  # fmt: skip
DIPS = {
    "id": "dips",
    "figure": "fig5",
    "model": "llama31_8b",
    "text": "dips at layers 3 and 5",
    "paper_value": "dips at layers 3 and 5",
    "predicate": {"metric": "acc", "layers": [3, 5], "statistic": "max", "op": "<",
                  "value": "median"},
}  # fmt: skip


def figure_frame(
    deltas: list[float],
    model: str = "llama31_8b",
    metric: str = "acc",
    figure: str = "fig5",
    series: str = "LLaMA-3.1-8B",
    baseline: float = 0.9,
    significant: list[bool] | None = None,
    **extra,
) -> pd.DataFrame:
    """A fig5-like CSV frame: one layer sweep; ``significant`` per layer (default: none)."""
    significant = significant or [False] * len(deltas)
    rows = [
        {"figure": figure, "panel": 0, "series": series, "model": model, "task": "kv",
         "metric": metric, "ablation_kind": "layer", "layer": layer, "head": math.nan,
         "ablation": f"layer{layer}", "score": baseline + delta, "baseline": baseline,
         "delta": delta, "stderr": 0.01, "n_samples": 100, "hit_budget": math.nan,
         "model_revision": "abc", "p_holm": 0.001 if sig else 0.5, "significant": sig} | extra
        for layer, (delta, sig) in enumerate(zip(deltas, significant, strict=True))
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=COLUMNS)


def verdicts(
    raw_claims, *frames: pd.DataFrame, models=("llama31_8b",), num_layers=None, index="claim"
) -> pd.DataFrame:
    """Verdicts with each frame as the CSV of the figure it names; every figure draws ``models``
    (of ``num_layers`` layers: model id -> count)."""
    claims = [parse_claim(raw) for raw in raw_claims]
    by_figure = {frame["figure"].iloc[0]: frame for frame in frames}
    figure_models = {figure: set(models) for figure in by_figure}
    return check_claims(claims, by_figure, figure_models, num_layers).set_index(index)


def with_predicate(claim: dict, **changes) -> dict:
    return claim | {"predicate": claim["predicate"] | changes}


def test_predicate_holds_and_fails():
    holds = verdicts([KV_FIRST, DIPS], figure_frame([-0.8, -0.5, 0, -0.2, 0, -0.1, 0, 0]))
    assert holds.loc["kv_first", "reproduced_value"] == pytest.approx(-0.8)
    assert holds.loc["kv_first", "verdict"] == "holds"
    assert holds.loc["dips", "verdict"] == "holds"  # max(-0.2, -0.1) < median 0
    fails = verdicts([KV_FIRST, DIPS], figure_frame([-0.2, -0.1, 0, -0.2, 0, 0, 0, -0.1]))
    assert fails.loc["kv_first", "reproduced_value"] == pytest.approx(-0.2)
    assert fails.loc["kv_first", "verdict"] == "does not hold"
    assert fails.loc["dips", "verdict"] == "does not hold"  # layer 5: 0, not < median 0
    assert list(fails.reset_index().columns) == [
        "claim", "figure", "model", "text", "paper_value", "reproduced_value", "verdict",
    ]  # fmt: skip
    assert (fails["model"] == "llama31_8b").all()  # a named model's claim: that model


def test_other_model_is_not_comparable_but_computed():
    frame = figure_frame([-0.8, -0.5, 0, 0], model="smollm2")
    result = verdicts([KV_FIRST], frame, models=("smollm2",))
    assert result.loc["kv_first", "verdict"] == "not comparable"
    assert result.loc["kv_first", "reproduced_value"] == pytest.approx(-0.8)
    # The CSV is the paper's model, but the config passed says the figure ran another one.
    result = verdicts([KV_FIRST], figure_frame([-0.8, 0]), models=("smollm2",))
    assert result.loc["kv_first", "verdict"] == "not comparable"


def test_absent_units_or_figure_are_not_comparable():
    result = verdicts([KV_FIRST], figure_frame([-0.8]))  # layer 1 missing
    assert result.loc["kv_first", "verdict"] == "not comparable"
    assert result.loc["kv_first", "reproduced_value"] == pytest.approx(-0.8)
    missing = check_claims([parse_claim(KV_FIRST)], {}, {}).iloc[0]
    assert missing["verdict"] == "not comparable" and math.isnan(missing["reproduced_value"])


def test_metric_name_matches_any_filter_and_ambiguity_is_an_error():
    generative = KV_FIRST | {"predicate": KV_FIRST["predicate"] | {"metric": "exact_match"}}
    frame = figure_frame([-0.75, 0], metric="exact_match,flexible-extract")
    assert verdicts([generative], frame).loc["kv_first", "verdict"] == "holds"
    two_series = pd.concat([frame, frame.assign(series="other")])
    with pytest.raises(ValueError, match=r"'kv_first'.*several series"):
        verdicts([generative], two_series)
    narrowed = generative | {"predicate": generative["predicate"] | {"series": "other"}}
    assert verdicts([narrowed], two_series).loc["kv_first", "verdict"] == "holds"


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        ({"predicate": {"metric": "acc", "statistic": "min", "value": -0.5}}, "predicate.op"),
        ({"predicate": KV_FIRST["predicate"] | {"statistic": "median"}}, "predicate.statistic"),
        ({"predicate": KV_FIRST["predicate"] | {"value": [-0.7]}}, "predicate.value"),
        ({"predicate": KV_FIRST["predicate"] | {"layer": [0]}}, "predicate.layer"),
        ({"predicate": KV_FIRST["predicate"] | {"heads": [-1]}}, "predicate.heads"),
        ({"predicate": KV_FIRST["predicate"] | {"quantity": "ratio"}}, "predicate.quantity"),
        (
            {
                "predicate": KV_FIRST["predicate"]
                | {"statistic": "significant_drops", "quantity": "score"}
            },
            "predicate.quantity",
        ),
        ({"predicate": KV_FIRST["predicate"] | {"than": "fig8"}}, "predicate.than"),
        (
            {"predicate": KV_FIRST["predicate"] | {"than": {"figures": "fig8"}}},
            "predicate.than.figures",
        ),
        (
            {"predicate": KV_FIRST["predicate"] | {"than": {"statistic": "median"}}},
            "predicate.than.statistic",
        ),
        (
            {
                "predicate": KV_FIRST["predicate"]
                | {"op": "<", "value": "median", "than": {"figure": "fig8"}}
            },
            "predicate.value",
        ),
        ({"paper_value": None}, "paper_value"),
        ({"figures": "fig5"}, "figures"),
    ],
)
def test_malformed_claim_names_id_and_key(edit, key):
    with pytest.raises(ValueError, match=re.escape(f"claim 'kv_first': {key}:")):
        parse_claim(KV_FIRST | edit)


def test_duplicate_ids_are_refused(tmp_path):
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump([KV_FIRST, KV_FIRST]))
    with pytest.raises(ValueError, match="duplicate claim ids"):
        load_claims(path)


def paper_skeleton(config: dict, figure: str) -> pd.DataFrame:
    """The CSV rows the paper config gives a figure (every unit, Δ −0.01 to −0.03 so that every
    unit has a share of the series' drop and units rank, nothing significant)."""
    rows = [
        {"figure": run.figure, "panel": run.panel, "series": run.series, "model": run.model,
         "task": run.task, "metric": run.metric, "ablation_kind": run.kind, "layer": run.layer,
         "head": run.head, "ablation": run.ablation, "score": 0.49, "baseline": 0.5,
         "delta": -0.01 * (1 + (run.layer + (run.head or 0)) % 3), "p_holm": 1.0,
         "significant": False}
        for run in figure_runs(config, figure)
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=COLUMNS)


def test_shipped_claims_select_real_units_of_the_paper_config():
    """Every shipped claim, and what it compares with, selects one series of the paper config
    drawn for its model with every named unit: on the config's own rows none is "not comparable"
    (nor ambiguous, which raises)."""
    claims = load_claims(SHIPPED)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    frames = {figure: paper_skeleton(config, figure) for figure in config["figures"]}
    models = {figure: set(frame["model"]) for figure, frame in frames.items()}
    num_layers = {model: spec["num_layers"] for model, spec in config["models"].items()}
    per_group = {m: s["num_heads"] // s["num_kv_heads"] for m, s in config["models"].items()}
    result = check_claims(claims, frames, models, num_layers, per_group).set_index("claim")
    assert not result["verdict"].str.startswith("not comparable").any(), result[
        ["figure", "verdict"]
    ]
    assert result["reproduced_value"].notna().all()


def test_shipped_claims_cover_every_figure():
    claims = load_claims(SHIPPED)
    assert {claim.figure for claim in claims} >= {f"fig{n}" for n in range(1, 23)}
    # Head figures have a single-query-head series too: their claims are the paper's semantics,
    # but for "heads of one group degrade alike", which that semantics makes true by construction.
    for claim in claims:
        if claim.figure in ("fig13", "fig16", "fig17", "fig18"):
            expected = (
                "single query head h" if claim.selection.statistic == "group_share" else PAPER_HEADS
            )
            assert claim.selection.series == expected, claim.id


def test_shipped_qwen3_layer_claims_take_the_most_affected_layer():
    """Figs 11-12: "layers 6, 23 and 35 show substantial drops, Δ below −0.5 in the most affected
    regions": the minimum over the three decides, not each of them."""
    claims = {claim.id: claim for claim in load_claims(SHIPPED)}
    for claim_id, figure in [("gsm8k_1shot_qwen3_layers_6_23_35", "fig11"),
                             ("gsm8k_4shot_qwen3_layers_6_23_35", "fig12")]:  # fmt: skip
        deltas = [0.0] * 36
        deltas[6], deltas[23], deltas[35] = -0.6, -0.1, -0.2
        frame = figure_frame(deltas, "qwen3_8b", "exact_match,flexible-extract", figure)
        result = check_claims([claims[claim_id]], {figure: frame}, {figure: {"qwen3_8b"}}).iloc[0]
        assert (result["reproduced_value"], result["verdict"]) == (pytest.approx(-0.6), "holds")
        deltas[6] = -0.45  # the largest drop is now −0.45
        frame = figure_frame(deltas, "qwen3_8b", "exact_match,flexible-extract", figure)
        result = check_claims([claims[claim_id]], {figure: frame}, {figure: {"qwen3_8b"}}).iloc[0]
        assert result["verdict"] == "does not hold"


def test_shipped_kv_claim_covers_every_layer_past_the_first_five():
    """Fig 5's "Δ close to zero beyond the lower layers" includes the last layer (31), and reads
    "lower layers" as the model-agnostic claim does (l < 0.15L: 0-4)."""
    claim = next(
        c for c in load_claims(SHIPPED) if c.id == "kv_retrieval_llama31_past_first_layers"
    )
    early_only = figure_frame([-0.8] * 5 + [-0.01] * 27, significant=[True] * 5 + [False] * 27)
    result = check_claims([claim], {"fig5": early_only}, {"fig5": {"llama31_8b"}}).iloc[0]
    assert (result["reproduced_value"], result["verdict"]) == (0, "holds")
    for layer in (5, 31):
        significant = [True] * 5 + [False] * 27
        significant[layer] = True
        frame = figure_frame([-0.8] * 5 + [-0.01] * 27, significant=significant)
        result = check_claims([claim], {"fig5": frame}, {"fig5": {"llama31_8b"}}).iloc[0]
        assert (result["reproduced_value"], result["verdict"]) == (1, "does not hold")


def test_head_units():
    frame = figure_frame([0.0, -0.6, -0.3, 0.0], ablation_kind="head").assign(
        layer=8, head=range(4), ablation=[f"head8.{h}" for h in range(4)]
    )
    heads = KV_FIRST | {"predicate": KV_FIRST["predicate"] | {"layers": [8], "heads": [1, 2]}}
    result = verdicts([heads], frame).loc["kv_first"]
    assert (result["reproduced_value"], result["verdict"]) == (pytest.approx(-0.6), "does not hold")
    absent = heads | {"predicate": heads["predicate"] | {"heads": [1, 9]}}
    assert verdicts([absent], frame).loc["kv_first", "verdict"] == "not comparable"


def test_quantity_score_and_baseline():
    baseline = with_predicate(KV_FIRST, quantity="baseline", statistic="max", op=">", value=0.85)
    score = with_predicate(KV_FIRST, quantity="score", statistic="min", op="between",
                           value=[0.05, 0.15])  # fmt: skip
    result = verdicts([baseline], figure_frame([-0.8, 0.0]))  # baseline 0.9
    assert result.loc["kv_first", "verdict"] == "holds"
    assert result.loc["kv_first", "reproduced_value"] == pytest.approx(0.9)
    result = verdicts([baseline], figure_frame([-0.8, 0.0], baseline=0.8))
    assert result.loc["kv_first", "verdict"] == "does not hold"
    result = verdicts([score], figure_frame([-0.8, 0.0]))  # scores 0.1, 0.9
    assert result.loc["kv_first", "reproduced_value"] == pytest.approx(0.1)
    assert result.loc["kv_first", "verdict"] == "holds"
    result = verdicts([score], figure_frame([-0.6, 0.0]))  # scores 0.3, 0.9
    assert result.loc["kv_first", "verdict"] == "does not hold"


def test_significant_drops_and_gains_count_units():
    deltas = [-0.3, -0.2, 0.1, -0.01, 0.05]
    significant = [True, False, True, False, True]
    frame = figure_frame(deltas, significant=significant)
    drops = with_predicate(KV_FIRST, layers=[1, 2, 3, 4], statistic="significant_drops",
                           op="<=", value=0)  # fmt: skip
    result = verdicts([drops], frame).loc["kv_first"]
    # Layer 1 drops without significance, 2 and 4 are significant gains: no significant drop.
    assert (result["reproduced_value"], result["verdict"]) == (0, "holds")
    with_layer0 = with_predicate(drops, layers=[0, 1, 2, 3, 4])
    result = verdicts([with_layer0], frame).loc["kv_first"]
    assert (result["reproduced_value"], result["verdict"]) == (1, "does not hold")
    gains = with_predicate(drops, statistic="significant_gains", op=">=", value=2)
    result = verdicts([gains], frame).loc["kv_first"]
    assert (result["reproduced_value"], result["verdict"]) == (2, "holds")
    result = verdicts([with_predicate(gains, layers=[0, 1, 2])], frame).loc["kv_first"]
    assert (result["reproduced_value"], result["verdict"]) == (1, "does not hold")
    untested = frame.assign(p_holm=[0.001, math.nan, 0.001, 0.5, 0.001])
    result = verdicts([drops], untested).loc["kv_first"]
    assert result["verdict"] == "not comparable" and math.isnan(result["reproduced_value"])


OPEN_BOOK = {
    "id": "open_book",
    "figure": "fig6",
    "model": "llama31_8b",
    "text": "open book: higher baseline",
    "paper_value": "higher",
    "predicate": {"metric": "acc", "series": "open", "quantity": "baseline", "statistic": "mean",
                  "than": {"series": "closed"}, "op": ">", "value": 0},
}  # fmt: skip


def test_than_compares_with_another_series():
    def fig6(open_deltas, open_baseline, closed_deltas, closed_baseline):
        return pd.concat([
            figure_frame(open_deltas, figure="fig6", series="open", baseline=open_baseline),
            figure_frame(closed_deltas, figure="fig6", series="closed", baseline=closed_baseline),
        ])  # fmt: skip

    smaller_drops = with_predicate(OPEN_BOOK, quantity="delta")
    smaller_drops["id"] = "smaller_drops"
    frame = fig6([-0.1, -0.1, 0.0], 0.8, [-0.3, -0.1, -0.2], 0.6)
    result = verdicts([OPEN_BOOK, smaller_drops], frame)
    assert result.loc["open_book", "reproduced_value"] == pytest.approx(0.2)  # 0.8 − 0.6
    assert result.loc["smaller_drops", "reproduced_value"] == pytest.approx(0.4 / 3)  # mean Δs
    assert (result["verdict"] == "holds").all()
    frame = fig6([-0.3, -0.2, -0.2], 0.6, [-0.1, -0.1, 0.0], 0.7)
    result = verdicts([OPEN_BOOK, smaller_drops], frame)
    assert result.loc["open_book", "reproduced_value"] == pytest.approx(-0.1)
    assert (result["verdict"] == "does not hold").all()
    unknown = with_predicate(OPEN_BOOK, than={"series": "no such series"})
    assert verdicts([unknown], frame).loc["open_book", "verdict"] == "not comparable"


def test_than_compares_with_other_units_of_the_series():
    # "Later layers comparatively stable": min Δ of layers 2-3 above min Δ of layers 0-1.
    stable = with_predicate(KV_FIRST, layers=[2, 3], than={"layers": [0, 1]}, op=">", value=0)
    result = verdicts([stable], figure_frame([-0.06, -0.02, -0.01, 0.0]))
    assert result.loc["kv_first", "reproduced_value"] == pytest.approx(0.05)  # −0.01 − (−0.06)
    assert result.loc["kv_first", "verdict"] == "holds"
    result = verdicts([stable], figure_frame([-0.06, -0.02, -0.08, 0.0]))
    assert result.loc["kv_first", "verdict"] == "does not hold"
    # layers: null in than means every layer of the series (own min −0.01, series min −0.06).
    every = with_predicate(stable, than={"layers": None}, op="<", value=0)
    result = verdicts([every], figure_frame([-0.06, -0.02, -0.01, 0.0]))
    assert result.loc["kv_first", "reproduced_value"] == pytest.approx(0.05)
    assert result.loc["kv_first", "verdict"] == "does not hold"


WEAKER = {
    "id": "weaker",
    "figure": "fig9",
    "model": "llama1_7b",
    "text": "layer 10's heads drop less than layer 8's",
    "paper_value": "weaker",
    "predicate": {"metric": "acc", "statistic": "min", "than": {"figure": "fig8"}, "op": ">",
                  "value": 0},
}  # fmt: skip


def test_than_compares_with_another_figure_and_model():
    fig8 = figure_frame([-0.05, -0.01, 0.0], "llama1_7b", figure="fig8")
    fig9 = figure_frame([-0.02, 0.0, 0.01], "llama1_7b", figure="fig9")
    result = verdicts([WEAKER], fig9, fig8, models=("llama1_7b",)).loc["weaker"]
    assert (result["reproduced_value"], result["verdict"]) == (pytest.approx(0.03), "holds")
    fig9 = figure_frame([-0.07, 0.0, 0.01], "llama1_7b", figure="fig9")
    result = verdicts([WEAKER], fig9, fig8, models=("llama1_7b",)).loc["weaker"]
    assert (result["reproduced_value"], result["verdict"]) == (
        pytest.approx(-0.02),
        "does not hold",
    )
    missing = verdicts([WEAKER], fig9, models=("llama1_7b",)).loc["weaker"]
    assert missing["verdict"] == "not comparable" and math.isnan(missing["reproduced_value"])
    # The compared figure's model is the claim's unless `than` names another: "converges to the
    # LLaMA baseline" compares R1-Distill's last score with LLaMA-3.1-8B's fig14 baseline.
    converges = {
        "id": "converges", "figure": "fig21", "model": "r1_distill_llama8b", "text": "converges",
        "paper_value": "LLaMA baseline",
        "predicate": {"metric": "exact_match", "layers": [2], "quantity": "score",
                      "statistic": "mean", "op": "abs<=", "value": 0.1,
                      "than": {"figure": "fig14", "model": "llama31_8b", "quantity": "baseline"}},
    }  # fmt: skip
    fig21 = figure_frame([-0.4, -0.3, -0.25], "r1_distill_llama8b", "exact_match", "fig21",
                         baseline=0.8)  # fmt: skip
    fig14 = figure_frame([-0.6, 0.0, 0.0], "llama31_8b", "exact_match", "fig14", baseline=0.5)
    models = ("r1_distill_llama8b", "llama31_8b")
    result = verdicts([converges], fig21, fig14, models=models).loc["converges"]
    assert (result["reproduced_value"], result["verdict"]) == (pytest.approx(0.05), "holds")
    result = verdicts([converges], fig21, fig14.assign(baseline=0.4), models=models).loc[
        "converges"
    ]
    assert (result["reproduced_value"], result["verdict"]) == (pytest.approx(0.15), "does not hold")
    stand_in = fig14.assign(model="smollm2")  # the compared figure ran another model
    result = verdicts([converges], fig21, stand_in, models=(*models, "smollm2")).loc["converges"]
    assert result["verdict"] == "not comparable"


def test_claim_figures_names_the_compared_figures_of_the_config():
    claims = [parse_claim(WEAKER), parse_claim(OPEN_BOOK), parse_claim(KV_FIRST)]
    assert claim_figures(claims, "fig9", ["fig8", "fig9"]) == ["fig9", "fig8"]
    assert claim_figures(claims, "fig9", ["fig9"]) == ["fig9"]  # a config without fig8
    assert claim_figures(claims, "fig6", ["fig6", "fig8"]) == ["fig6"]  # same-figure than
    assert claim_figures(claims, "fig5", ["fig5", "fig8"]) == ["fig5"]


def test_than_inherits_the_claims_own_selection():
    claim = parse_claim(with_predicate(WEAKER, layers=[10], quantity="score"))
    assert claim.than is not None
    assert (claim.than.figure, claim.than.model, claim.than.metric) == ("fig8", "llama1_7b", "acc")
    assert (claim.than.layers, claim.than.quantity, claim.than.statistic) == ((10,), "score", "min")


ANY_DEPTH = {
    "id": "any_depth",
    "figure": "fig5",
    "model": "any",
    "text": "a significant drop in the middle layers",
    "paper_value": "drops",
    "predicate": {"metric": "acc", "depth": [0.3, 0.7], "statistic": "significant_drops",
                  "op": ">=", "value": 1},
}  # fmt: skip


@pytest.mark.parametrize(
    ("num_layers", "depth", "expected"),
    [
        (30, [0, 0.125], range(0, 4)),  # early: l < L/8
        (32, [0, 0.125], range(0, 4)),
        (36, [0, 0.125], range(0, 5)),
        (30, [0, 0.15], range(0, 5)),  # first 15%
        (32, [0, 0.15], range(0, 5)),
        (36, [0, 0.15], range(0, 6)),
        (30, [0.3, 0.7], range(9, 21)),  # middle: 9/30 is 0.3 exactly, 21/30 is 0.7
        (32, [0.3, 0.7], range(10, 23)),
        (36, [0.3, 0.7], range(11, 26)),
        (30, [0.7, 1], range(21, 30)),  # deep, the last layer included
        (32, [0.7, 1], range(23, 32)),
        (36, [0.7, 1], range(26, 36)),
        (30, "last", [29]),
        (32, "last", [31]),
        (36, "last", [35]),
    ],
)
def test_depth_selects_fractions_of_the_models_layers(num_layers, depth, expected):
    claim = with_predicate(ANY_DEPTH, depth=depth, statistic="significant_drops")
    parsed = parse_claim(claim).selection.depth
    assert depth_layers(parsed, num_layers) == tuple(expected)
    # Through the check: a significant drop at exactly the expected layers counts them all...
    inside = [layer in expected for layer in range(num_layers)]
    frame = figure_frame([-0.2] * num_layers, "m", significant=inside)
    result = verdicts([claim], frame, models=("m",), num_layers={"m": num_layers}).iloc[0]
    assert (result["reproduced_value"], result["verdict"]) == (len(expected), "holds")
    # ...and one at every other layer counts none.
    outside = figure_frame([-0.2] * num_layers, "m", significant=[not i for i in inside])
    result = verdicts([claim], outside, models=("m",), num_layers={"m": num_layers}).iloc[0]
    assert (result["reproduced_value"], result["verdict"]) == (0, "does not hold")
    # Without the model's layer count a depth selects nothing.
    result = verdicts([claim], frame, models=("m",), num_layers={}).iloc[0]
    assert result["verdict"] == "not comparable" and math.isnan(result["reproduced_value"])


def test_depth_takes_the_swept_layers_of_its_range():
    sweep = [0, 1, 2, 4, 7, 10, 14, 18, 22, 26, 28, 29]  # the demo's 12 of 30 layers
    frame = figure_frame([-0.3] + [-0.01] * 11, "smollm2").assign(layer=sweep)
    middle = with_predicate(ANY_DEPTH, statistic="mean", op="<", value=0)
    result = verdicts([middle], frame, models=("smollm2",), num_layers={"smollm2": 30}).iloc[0]
    assert (result["reproduced_value"], result["verdict"]) == (pytest.approx(-0.01), "holds")
    gap = with_predicate(middle, depth=[0.1, 0.13])  # layer 3 (3/30) was not swept
    result = verdicts([gap], frame, models=("smollm2",), num_layers={"smollm2": 30}).iloc[0]
    assert result["verdict"] == "not comparable"
    # than with depth: last layer (Δ −0.01) against the swept early ones (0-2: −0.3, −0.01, −0.01).
    last = with_predicate(middle, depth="last", than={"depth": [0, 0.125]}, op=">", value=0)
    result = verdicts([last], frame, models=("smollm2",), num_layers={"smollm2": 30}).iloc[0]
    assert (result["reproduced_value"], result["verdict"]) == (
        pytest.approx(0.32 / 3 - 0.01),
        "holds",
    )


def test_model_any_gives_one_verdict_per_model_of_the_csv():
    # Layer 5 is in the first 15% of 36 layers (5/36 < 0.15), not of 30 (5/30 > 0.15).
    first = with_predicate(ANY_DEPTH, depth=[0, 0.15])
    significant = {n: [layer == 5 for layer in range(n)] for n in (30, 36)}
    frame = pd.concat([
        figure_frame([-0.2] * 30, "smollm2", series="SmolLM2", significant=significant[30]),
        figure_frame([-0.2] * 36, "qwen3_8b", series="Qwen3-8B", significant=significant[36]),
    ])  # fmt: skip
    num_layers = {"smollm2": 30, "qwen3_8b": 36}
    result = verdicts([first], frame, models=tuple(num_layers), num_layers=num_layers,
                      index="model")  # fmt: skip
    assert list(result.index) == ["qwen3_8b", "smollm2"]
    assert (result["claim"] == "any_depth").all()
    assert result.loc["qwen3_8b", "reproduced_value"] == 1
    assert result.loc["qwen3_8b", "verdict"] == "holds"
    assert result.loc["smollm2", "reproduced_value"] == 0
    assert result.loc["smollm2", "verdict"] == "does not hold"
    # A model of the CSV its config does not draw (a stale CSV) is not comparable.
    result = verdicts([first], frame, models=("qwen3_8b",), num_layers=num_layers, index="model")
    assert result.loc["smollm2", "verdict"] == "not comparable"
    # No figure CSV: one row, not comparable.
    missing = check_claims([parse_claim(first)], {}, {}, num_layers)
    assert list(missing[["model", "verdict"]].iloc[0]) == ["any", "not comparable"]


def test_model_any_than_compares_each_model_with_its_own_series():
    # "Reasoning uses deeper layers than retrieval": deep GSM8K drops minus deep KV drops >= 1.
    deeper = {
        "id": "deeper", "figure": "fig14", "model": "any", "text": "deeper than KV",
        "paper_value": "deeper",
        "predicate": {"metric": "exact_match", "depth": [0.7, 1], "statistic": "significant_drops",
                      "than": {"figure": "fig5", "metric": "acc"}, "op": ">=", "value": 1},
    }  # fmt: skip
    deep = [layer >= 7 for layer in range(10)]  # layers 7-9 of 10
    one_deep = [layer == 9 for layer in range(10)]

    def sweep(figure, metric, model, significant):
        return figure_frame([-0.2] * 10, model, metric, figure, model, significant=significant)

    fig14 = pd.concat([sweep("fig14", "exact_match", "a", deep),
                       sweep("fig14", "exact_match", "b", one_deep),
                       sweep("fig14", "exact_match", "c", deep)])  # fmt: skip
    fig5 = pd.concat([sweep("fig5", "acc", "a", [False] * 10), sweep("fig5", "acc", "b", one_deep)])
    num_layers = {"a": 10, "b": 10, "c": 10}
    result = verdicts([deeper], fig14, fig5, models=("a", "b", "c"), num_layers=num_layers,
                      index="model")  # fmt: skip
    assert (result.loc["a", "reproduced_value"], result.loc["a", "verdict"]) == (3, "holds")
    assert (result.loc["b", "reproduced_value"], result.loc["b", "verdict"]) == (
        0, "does not hold",
    )  # fmt: skip
    assert result.loc["c", "verdict"] == "not comparable"  # c has no KV series in fig5


def test_baseline_at_floor_is_not_comparable():
    near_zero = with_predicate(ANY_DEPTH, metric="exact_match", op="<=", value=0)  # "≈ 0"
    near_zero["figure"] = "fig11"

    def gsm8k(baseline, figure="fig11", metric="exact_match,flexible-extract"):
        return figure_frame([0.0] * 30, "smollm2", metric, figure, baseline=baseline)

    def check(claim, *frames):
        return verdicts([claim], *frames, models=("smollm2",), num_layers={"smollm2": 30}).iloc[0]

    # A model that cannot do the task at all: no drop, but that says nothing.
    result = check(near_zero, gsm8k(0.0))
    assert (result["reproduced_value"], result["verdict"]) == (
        0,
        "not comparable: baseline at floor",
    )
    assert check(near_zero, gsm8k(0.25))["verdict"] == "holds"
    chance = with_predicate(near_zero, floor=0.25)  # a 4-option log-likelihood task at chance
    assert check(chance, gsm8k(0.25))["verdict"] == "not comparable: baseline at floor"
    assert check(chance, gsm8k(0.3))["verdict"] == "holds"
    # The compared selection's baseline counts too (its floor defaults to the claim's).
    versus_kv = with_predicate(near_zero, than={"figure": "fig5", "metric": "acc"},
                               op="abs<=", value=0)  # fmt: skip
    kv_at_floor = gsm8k(0.0, "fig5", "acc")
    assert (
        check(versus_kv, gsm8k(0.5), kv_at_floor)["verdict"] == "not comparable: baseline at floor"
    )
    assert check(versus_kv, gsm8k(0.5), gsm8k(0.5, "fig5", "acc"))["verdict"] == "holds"
    # A missing figure outranks a floor; a named model's claim has no floor unless it sets one.
    assert check(versus_kv, gsm8k(0.0))["verdict"] == "not comparable"
    named = near_zero | {"model": "smollm2"}
    assert check(named, gsm8k(0.0))["verdict"] == "holds"


@pytest.mark.parametrize(
    ("claim", "edit", "key"),
    [
        (ANY_DEPTH, {"depth": [0.5, 0.2]}, "predicate.depth"),
        (ANY_DEPTH, {"depth": [0, 1.5]}, "predicate.depth"),
        (ANY_DEPTH, {"depth": [-0.1, 0.5]}, "predicate.depth"),
        (ANY_DEPTH, {"depth": [0.1]}, "predicate.depth"),
        (ANY_DEPTH, {"depth": [0, True]}, "predicate.depth"),
        (ANY_DEPTH, {"depth": "deep"}, "predicate.depth"),
        (ANY_DEPTH, {"layers": [0, 1]}, "predicate.depth"),  # layers and depth
        (ANY_DEPTH, {"than": {"depth": "first"}}, "predicate.than.depth"),
        (ANY_DEPTH, {"floor": "chance"}, "predicate.floor"),
        (KV_FIRST, {"than": {"model": "any"}}, "predicate.than.model"),
    ],
)
def test_malformed_depth_names_id_and_key(claim, edit, key):
    with pytest.raises(ValueError, match=re.escape(f"claim {claim['id']!r}: {key}:")) as error:
        parse_claim(with_predicate(claim, **edit))
    assert "\n" not in str(error.value)


def test_shipped_model_agnostic_claims_apply_to_the_demo_model():
    """The demo's SmolLM2 (30 layers, 12 swept in most figures) gets a verdict for each
    model: any claim, and "baseline at floor" where it scores 0."""
    claims = [claim for claim in load_claims(SHIPPED) if claim.model == "any"]
    assert len(claims) >= 20
    config = yaml.safe_load((REPO / "workflow/config/demo.yaml").read_text())
    frames = {figure: paper_skeleton(config, figure) for figure in config["figures"]}
    models = {figure: set(frame["model"]) for figure, frame in frames.items()}
    num_layers = {model: spec["num_layers"] for model, spec in config["models"].items()}
    result = check_claims(claims, frames, models, num_layers)
    assert list(result["claim"]) == [claim.id for claim in claims]  # one model each
    assert set(result["model"]) == {"smollm2"}
    assert result["verdict"].isin(["holds", "does not hold"]).all(), result[["claim", "verdict"]]
    floored = {figure: frame.assign(baseline=0.0, score=0.0) for figure, frame in frames.items()}
    result = check_claims(claims, floored, models, num_layers)
    assert (result["verdict"] == "not comparable: baseline at floor").all()


def test_drop_share_is_the_units_part_of_the_series_drop():
    """Figs 1-2 "concentrated in the earliest layers": the early layers' part of all the drop,
    gains not offsetting it; a series that drops nowhere is not comparable."""
    claim = with_predicate(KV_FIRST, layers=[0, 1], statistic="drop_share", op=">=", value=0.5)
    concentrated = figure_frame([-0.3, -0.2, 0.05, -0.1, 0.0, -0.1])
    result = verdicts([claim], concentrated).loc["kv_first"]
    assert (result["reproduced_value"], result["verdict"]) == (pytest.approx(0.5 / 0.7), "holds")
    spread = figure_frame([-0.1, -0.1, -0.1, -0.1, -0.1, -0.1])
    assert verdicts([claim], spread).loc["kv_first", "verdict"] == "does not hold"
    flat = figure_frame([0.0, 0.1, 0.0, 0.0, 0.0, 0.0])
    assert verdicts([claim], flat).loc["kv_first", "verdict"] == "not comparable"
    with pytest.raises(ValueError, match="quantity must be delta"):
        parse_claim(with_predicate(claim, quantity="score"))


def test_half_drop_units_is_the_sparse_subset_carrying_half_the_drop():
    """Figs 13, 16-18 "a sparse subset of heads": the fewest units carrying half of the drop."""
    claim = with_predicate(KV_FIRST, layers=None, statistic="half_drop_units", op="<=", value=0.25)
    sparse = figure_frame([-0.6, 0.0, -0.05, 0.0, -0.05, 0.0, 0.02, -0.1])  # -0.6 of -0.8: 1 unit
    result = verdicts([claim], sparse).loc["kv_first"]
    assert (result["reproduced_value"], result["verdict"]) == (pytest.approx(1 / 8), "holds")
    even = figure_frame([-0.1] * 8)  # half the drop takes 4 of 8 units
    result = verdicts([claim], even).loc["kv_first"]
    assert (result["reproduced_value"], result["verdict"]) == (pytest.approx(0.5), "does not hold")


def test_similar_patterns_are_a_rank_correlation_unit_by_unit():
    claim = {"id": "similar", "figure": "fig12", "model": "llama31_8b", "text": "t",
             "paper_value": "similar",
             "predicate": {"metric": "acc", "statistic": "spearman", "than": {"figure": "fig11"},
                           "op": ">=", "value": 0.5}}  # fmt: skip
    one_shot = figure_frame([-0.5, -0.1, -0.3, 0.0, -0.2], figure="fig11")
    alike = figure_frame([-0.6, -0.05, -0.4, 0.01, -0.1], figure="fig12")  # the same ranks
    reversed_ = figure_frame([0.0, -0.4, -0.2, -0.6, -0.3], figure="fig12")
    assert verdicts([claim], alike, one_shot).loc["similar", "reproduced_value"] == pytest.approx(1)
    result = verdicts([claim], reversed_, one_shot).loc["similar"]
    assert result["reproduced_value"] == pytest.approx(-1.0)
    assert result["verdict"] == "does not hold"
    with pytest.raises(ValueError, match="spearman compares a selection with its than"):
        parse_claim(with_predicate(claim, than=None))


def test_group_share_is_the_kv_groups_share_of_the_heads_delta_variance():
    claim = {"id": "groups", "figure": "fig13", "model": "qwen3_8b", "text": "t",
             "paper_value": "alike",
             "predicate": {"metric": "acc", "statistic": "group_share", "op": ">=",
                           "value": 0.5}}  # fmt: skip
    # 6 heads, 2 per group: groups (-0.4, -0.6), (0.0, 0.0), (-0.1, -0.1).
    deltas = [-0.4, -0.6, 0.0, 0.0, -0.1, -0.1]
    frame = figure_frame(deltas, model="qwen3_8b", figure="fig13").assign(
        ablation_kind="head", layer=35, head=range(6)
    )
    # mean -0.2; SS_total = 0.04+0.16+0.04+0.04+0.01+0.01 = 0.30; group means -0.5, 0, -0.1:
    # SS_between = 2·(0.09 + 0.04 + 0.01) = 0.28; η² = 0.28 / 0.30.
    claims = [parse_claim(claim)]
    result = check_claims(claims, {"fig13": frame}, {"fig13": {"qwen3_8b"}}, {}, {"qwen3_8b": 2})
    assert result.iloc[0]["reproduced_value"] == pytest.approx(0.28 / 0.30)
    assert result.iloc[0]["verdict"] == "holds"
    # Groups of three heads mix them: (-0.4, -0.6, 0.0), (0.0, -0.1, -0.1), means -1/3 and -1/15:
    # SS_between = 3·2·(2/15)² = 8/75; η² = (8/75) / 0.30 = 16/45.
    result = check_claims(claims, {"fig13": frame}, {"fig13": {"qwen3_8b"}}, {}, {"qwen3_8b": 3})
    assert result.iloc[0]["reproduced_value"] == pytest.approx(16 / 45)
    unknown = check_claims(claims, {"fig13": frame}, {"fig13": {"qwen3_8b"}}).iloc[0]
    assert unknown["verdict"] == "not comparable"


def test_layer_by_layer_comparisons_of_two_series():
    claim = {"id": "c", "figure": "fig6", "model": "llama31_8b", "text": "t", "paper_value": "p",
             "predicate": {"metric": "acc", "series": "open", "statistic": "share_above",
                           "than": {"series": "closed"}, "op": ">=", "value": 0.8}}  # fmt: skip
    closed = figure_frame([-0.3, -0.2, -0.2, -0.1, -0.3], figure="fig6", series="closed")
    opened = figure_frame([-0.1, -0.25, -0.05, 0.0, -0.05], figure="fig6", series="open")
    frame = pd.concat([closed, opened])
    # Open above closed at layers 0, 2, 3, 4 (gaps 0.2, 0.15, 0.1, 0.25), not at layer 1.
    assert verdicts([claim], frame).loc["c", "reproduced_value"] == pytest.approx(0.8)
    peak = with_predicate(claim, statistic="peak_gap_depth", op=">=", value=0.3)
    result = verdicts([peak], frame, num_layers={"llama31_8b": 5}).loc["c"]
    assert result["reproduced_value"] == pytest.approx(4 / 5) and result["verdict"] == "holds"
    assert verdicts([peak], frame).loc["c", "verdict"] == "not comparable"  # no layer count
