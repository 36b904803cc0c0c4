"""Claims as predicates over figure CSVs: verdicts on hand-made frames, and the YAML's validity."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ablate.aggregate import COLUMNS
from ablate.claims import check_claims, load_claims, parse_claim
from ablate.config import panel_series

REPO = Path(__file__).resolve().parents[1]

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


def figure_frame(deltas: list[float], model: str = "llama31_8b", metric: str = "acc", **extra):
    """A fig5-like CSV frame: one layer sweep, baseline 0.9."""
    rows = [
        {"figure": "fig5", "panel": 0, "series": "LLaMA-3.1-8B", "model": model, "task": "kv",
         "metric": metric, "ablation_kind": "layer", "layer": layer, "head": math.nan,
         "ablation": f"layer{layer}", "score": 0.9 + delta, "baseline": 0.9, "delta": delta,
         "stderr": 0.01, "n_samples": 100, "hit_budget": math.nan, "model_revision": "abc"} | extra
        for layer, delta in enumerate(deltas)
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=COLUMNS)


def verdicts(raw_claims, frame, models=("llama31_8b",)) -> pd.DataFrame:
    claims = [parse_claim(raw) for raw in raw_claims]
    return check_claims(claims, {"fig5": frame}, {"fig5": set(models)}).set_index("claim")


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
        "claim", "figure", "text", "paper_value", "reproduced_value", "verdict",
    ]  # fmt: skip


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


def test_shipped_claims_match_the_paper_config():
    claims = load_claims(REPO / "workflow/config/claims.yaml")
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    assert len(claims) >= 10
    for claim in claims:
        figure = config["figures"][claim.figure]
        drawn = {(panel["metric"], series["model"]) for _, panel, series in panel_series(figure)}
        assert any(
            claim.model == model and claim.metric in (metric, metric.split(",")[0])
            for metric, model in drawn
        ), f"{claim.id}: {claim.figure} draws no {claim.metric} of {claim.model}"
        layers = config["models"][claim.model]["num_layers"]
        assert all(layer < layers for layer in claim.layers or ()), claim.id


def test_head_units():
    frame = figure_frame([0.0, -0.6, -0.3, 0.0], ablation_kind="head").assign(
        layer=8, head=range(4), ablation=[f"head8.{h}" for h in range(4)]
    )
    heads = KV_FIRST | {"predicate": KV_FIRST["predicate"] | {"layers": [8], "heads": [1, 2]}}
    result = verdicts([heads], frame).loc["kv_first"]
    assert (result["reproduced_value"], result["verdict"]) == (pytest.approx(-0.6), "does not hold")
    absent = heads | {"predicate": heads["predicate"] | {"heads": [1, 9]}}
    assert verdicts([absent], frame).loc["kv_first", "verdict"] == "not comparable"
