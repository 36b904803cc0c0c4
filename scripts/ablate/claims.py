"""The paper's quantitative claims as data (workflow/config/claims.yaml), checked on figure CSVs.

A claim selects one series of one figure CSV (metric, optionally panel and series), a set of
ablated units (layers, heads), reduces their Δ with a statistic (min, max, mean) and compares it
with a threshold. The verdict is "holds", "does not hold", or "not comparable" when the CSV is
about another model than the paper's (the demo's stand-in), or lacks the units the claim names.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

STATISTICS = ("min", "max", "mean")
OPS: dict[str, Callable[[float, Any], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
    "abs<=": lambda value, bound: abs(value) <= bound,
    "between": lambda value, bounds: bounds[0] <= value <= bounds[1],
}
RELATIVE = "median"  # threshold = the median Δ over every unit of the selected series
CLAIM_KEYS = ("id", "figure", "model", "text", "paper_value", "predicate")
PREDICATE_KEYS = ("metric", "panel", "series", "layers", "heads", "statistic", "op", "value")
RESULT_COLUMNS = ["claim", "figure", "text", "paper_value", "reproduced_value", "verdict"]


@dataclass(frozen=True)
class Claim:
    """One checkable statement; ``layers``/``heads`` None means every unit of the series."""

    id: str
    figure: str
    model: str
    text: str
    paper_value: float | str
    metric: str
    statistic: str
    op: str
    value: float | tuple[float, float] | str
    panel: int | None = None
    series: str | None = None
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None


def parse_claim(raw: Mapping[str, Any]) -> Claim:
    """A Claim from its YAML mapping; ValueError names the claim id and the offending key."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"a claim must be a mapping, not {raw!r}")
    claim_id = raw.get("id")

    def fail(key: str, problem: str) -> ValueError:
        return ValueError(f"claim {claim_id!r}: {key}: {problem}")

    if not isinstance(claim_id, str) or not claim_id:
        raise fail("id", "missing or not a non-empty string")
    _check_keys(raw, CLAIM_KEYS, CLAIM_KEYS, "", fail)
    for key in ("figure", "model", "text"):
        if not isinstance(raw[key], str):
            raise fail(key, f"must be a string, not {raw[key]!r}")
    if not isinstance(raw["paper_value"], str) and not _is_number(raw["paper_value"]):
        raise fail("paper_value", f"must be a number or a phrase, not {raw['paper_value']!r}")
    predicate = raw["predicate"]
    if not isinstance(predicate, Mapping):
        raise fail("predicate", f"must be a mapping, not {predicate!r}")
    required = ("metric", "statistic", "op", "value")
    _check_keys(predicate, PREDICATE_KEYS, required, "predicate.", fail)
    if not isinstance(predicate["metric"], str):
        raise fail("predicate.metric", f"must be a string, not {predicate['metric']!r}")
    if predicate["statistic"] not in STATISTICS:
        raise fail("predicate.statistic", f"{predicate['statistic']!r} not in {STATISTICS}")
    if predicate["op"] not in OPS:
        raise fail("predicate.op", f"{predicate['op']!r} not in {tuple(OPS)}")
    value = predicate["value"]
    if predicate["op"] == "between":
        if not (
            isinstance(value, list) and len(value) == 2 and all(map(_is_number, value))
        ) or not (value[0] <= value[1]):
            raise fail("predicate.value", f"between needs [low, high] numbers, not {value!r}")
        value = (float(value[0]), float(value[1]))
    elif value != RELATIVE and not _is_number(value):
        raise fail("predicate.value", f"must be a number or {RELATIVE!r}, not {value!r}")
    panel, series = predicate.get("panel"), predicate.get("series")
    if panel is not None and not _is_index(panel):
        raise fail("predicate.panel", f"must be a panel index (0, 1, ...), not {panel!r}")
    if series is not None and not isinstance(series, str):
        raise fail("predicate.series", f"must be a series label, not {series!r}")
    units = {}
    for key in ("layers", "heads"):
        indices = predicate.get(key)
        if indices is not None and not (
            isinstance(indices, list) and indices and all(map(_is_index, indices))
        ):
            raise fail(f"predicate.{key}", f"must be a non-empty list of indices, not {indices!r}")
        units[key] = tuple(indices) if indices is not None else None
    return Claim(
        id=claim_id,
        figure=raw["figure"],
        model=raw["model"],
        text=raw["text"],
        paper_value=raw["paper_value"],
        metric=predicate["metric"],
        statistic=predicate["statistic"],
        op=predicate["op"],
        value=value,
        panel=panel,
        series=series,
        **units,
    )


def _check_keys(
    mapping: Mapping,
    allowed: tuple[str, ...],
    required: tuple[str, ...],
    prefix: str,
    fail: Callable[[str, str], ValueError],
) -> None:
    for key in mapping:
        if key not in allowed:
            raise fail(f"{prefix}{key}", f"unknown key (allowed: {', '.join(allowed)})")
    for key in required:
        if key not in mapping:
            raise fail(f"{prefix}{key}", "missing")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_claims(path: Path) -> list[Claim]:
    """The claims of a YAML list; ValueError for a malformed or duplicate claim."""
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a list of claims")
    claims = [parse_claim(item) for item in raw]
    ids = [claim.id for claim in claims]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate claim ids {duplicates}")
    return claims


def check_claims(
    claims: Iterable[Claim],
    frames: Mapping[str, pd.DataFrame],
    figure_models: Mapping[str, set[str]],
) -> pd.DataFrame:
    """One row per claim: the reproduced statistic and the verdict.

    ``frames`` maps figure id to its CSV (aggregate.COLUMNS); ``figure_models`` maps figure id to
    the model ids its config draws. A claim is comparable only if its model is among them and is
    the model of every selected row; a missing figure or unit gives "not comparable" and NaN.
    """
    rows = []
    for claim in claims:
        value, comparable = math.nan, False
        frame = frames.get(claim.figure)
        if frame is not None:
            series = _series_rows(claim, frame)
            units, complete = _unit_rows(claim, series)
            if len(units):
                value = float(getattr(units["delta"], claim.statistic)(skipna=False))
                in_config = claim.model in figure_models.get(claim.figure, set())
                comparable = complete and in_config and set(units["model"]) == {claim.model}
        if comparable and not math.isnan(value):
            bound = series["delta"].median(skipna=False) if claim.value == RELATIVE else claim.value
            verdict = "holds" if OPS[claim.op](value, bound) else "does not hold"
        else:
            verdict = "not comparable"
        rows.append([claim.id, claim.figure, claim.text, claim.paper_value, value, verdict])
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def _series_rows(claim: Claim, frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of the one (panel, series) the claim's metric/panel/series select (maybe none)."""
    metric = frame["metric"].astype(str)
    if "," not in claim.metric:  # a bare metric name matches any filter
        metric = metric.str.split(",").str[0]
    keep = metric == claim.metric
    if claim.panel is not None:
        keep &= frame["panel"] == claim.panel
    if claim.series is not None:
        keep &= frame["series"] == claim.series
    rows = frame[keep]
    groups = rows[["panel", "series"]].drop_duplicates()
    if len(groups) > 1:
        found = ", ".join(f"panel {p} {s!r}" for p, s in groups.itertuples(index=False))
        raise ValueError(
            f"claim {claim.id!r}: {claim.figure} has several series for metric "
            f"{claim.metric!r} ({found}); set predicate.panel or predicate.series"
        )
    return rows


def _unit_rows(claim: Claim, rows: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """The rows of those of the claim's units present, and whether every named unit is."""
    complete = True
    if claim.layers is not None:
        complete = set(claim.layers) <= set(rows["layer"])
        rows = rows[rows["layer"].isin(claim.layers)]
    if claim.heads is not None:
        complete &= all(
            set(claim.heads) <= set(layer_rows["head"].dropna())
            for _, layer_rows in rows.groupby("layer")
        )
        rows = rows[rows["head"].isin(claim.heads)]
    return rows, complete and len(rows) > 0
