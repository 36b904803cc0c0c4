"""The paper's quantitative claims as data (workflow/config/claims.yaml), checked on figure CSVs.

A claim selects one series of one figure CSV (metric, optionally panel and series) and a set of
ablated units (layers, or ``depth``: a range of fractions of the model's layers; heads), reduces a
quantity of theirs (Δ, ablated score or baseline) with a statistic (min, max, mean, the count of
Holm-significant drops or gains, or their share of the series' whole drop) and compares it with a
threshold. With ``than`` it compares the
difference between its statistic and that of a second selection (another series, figure or set of
units). The verdict is "holds", "does not hold", or "not comparable" when a selection is about
another model than the claim's (the demo's stand-in), or lacks the figure or the units it names.

A claim of ``model: any`` (a model-agnostic finding) is checked once per model the figure's CSV
holds a matching series for, on that model's rows only (its ``than`` too, unless it names a
model); such a claim's ``floor`` (default 0) makes a series whose unablated baseline is at or
below it "not comparable: baseline at floor" (a task the model cannot do at all).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

# Counted units: significant (Holm-corrected, column `significant`) with Δ of this sign.
SIGNIFICANCE = {"significant_drops": -1, "significant_gains": 1}
DROP_SHARE = "drop_share"  # the units' Σ min(Δ, 0) over the series' Σ min(Δ, 0): "concentrated"
# The smallest fraction of the units whose drops carry half of their Σ min(Δ, 0): "a sparse subset"
HALF_DROP_UNITS = "half_drop_units"
DROP_STATISTICS = (DROP_SHARE, HALF_DROP_UNITS)
# With than, unit by unit (the units both selections hold): Spearman's ρ of their quantity
# ("similar patterns"); the share of units where it is higher ("across almost all layers"); the
# depth l / L of the unit where it is higher by the most ("the largest benefits appear in")
PAIRED_STATISTICS = ("spearman", "share_above", "peak_gap_depth")
# Heads of one layer: the share of their Δs' variance between KV groups (η²: "heads within the
# same group exhibit similar degradation patterns"); needs the model's heads per group
GROUP_SHARE = "group_share"
STATISTICS = ("min", "max", "mean", *SIGNIFICANCE, *DROP_STATISTICS, *PAIRED_STATISTICS,
              GROUP_SHARE)  # fmt: skip
QUANTITIES = ("delta", "score", "baseline")
OPS: dict[str, Callable[[float, Any], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
    "abs<=": lambda value, bound: abs(value) <= bound,
    "between": lambda value, bounds: bounds[0] <= value <= bounds[1],
}
RELATIVE = "median"  # threshold = the median Δ over every unit of the selected series
ANY_MODEL = "any"  # claim model: every model the figure's CSV holds a series for, one row each
LAST = "last"  # depth: the model's last layer
ANY_FLOOR = 0.0  # default floor of a model: any selection (baseline <= floor: not comparable)
CLAIM_KEYS = ("id", "figure", "model", "text", "paper_value", "predicate")
SELECTION_KEYS = (
    "metric", "panel", "series", "layers", "depth", "heads", "statistic", "quantity", "floor",
)  # fmt: skip
PREDICATE_KEYS = (*SELECTION_KEYS, "op", "value", "than")
THAN_KEYS = ("figure", "model", *SELECTION_KEYS)
RESULT_COLUMNS = ["claim", "figure", "model", "text", "paper_value", "reproduced_value", "verdict"]
NOT_COMPARABLE = "not comparable"
AT_FLOOR = "not comparable: baseline at floor"


@dataclass(frozen=True)
class Selection:
    """Units of one series of one figure and the statistic reducing them; ``layers`` (or
    ``depth``: [low, high) fractions of the model's layers, or "last") and ``heads`` None mean
    every unit of the series; ``floor``: a baseline at or below it is not comparable."""

    figure: str
    model: str
    metric: str
    statistic: str
    quantity: str = "delta"
    panel: int | None = None
    series: str | None = None
    layers: tuple[int, ...] | None = None
    depth: tuple[float, float] | str | None = None
    heads: tuple[int, ...] | None = None
    floor: float | None = None


@dataclass(frozen=True)
class Claim:
    """One checkable statement: ``op``/``value`` test the selection's statistic, or with ``than``
    its difference from the statistic of ``than``."""

    id: str
    text: str
    paper_value: float | str
    selection: Selection
    op: str
    value: float | tuple[float, float] | str
    than: Selection | None = None

    @property
    def figure(self) -> str:
        return self.selection.figure

    @property
    def model(self) -> str:
        return self.selection.model


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
    _check_keys(
        predicate, PREDICATE_KEYS, ("metric", "statistic", "op", "value"), "predicate.", fail
    )
    base = {"figure": raw["figure"], "model": raw["model"], "quantity": "delta"}
    if raw["model"] == ANY_MODEL:
        base["floor"] = ANY_FLOOR
    selection = _parse_selection(predicate, SELECTION_KEYS, base, "predicate.", fail)
    than = predicate.get("than")
    if than is not None:
        if not isinstance(than, Mapping):
            raise fail("predicate.than", f"must be a mapping, not {than!r}")
        _check_keys(than, THAN_KEYS, (), "predicate.than.", fail)
        if than.get("model") == ANY_MODEL != raw["model"]:
            raise fail("predicate.than.model", f"{ANY_MODEL!r} only in a model: any claim")
        # Every key than leaves out is the claim's own (null resets layers/heads to every unit).
        than = _parse_selection(
            than, THAN_KEYS, dataclasses.asdict(selection), "predicate.than.", fail
        )
    paired = selection.statistic in PAIRED_STATISTICS
    if paired and (than is None or than.statistic != selection.statistic):
        raise fail(
            "predicate.statistic", f"{selection.statistic} compares a selection with its than"
        )
    if predicate["op"] not in OPS:
        raise fail("predicate.op", f"{predicate['op']!r} not in {tuple(OPS)}")
    value = predicate["value"]
    if predicate["op"] == "between":
        if not (
            isinstance(value, list) and len(value) == 2 and all(map(_is_number, value))
        ) or not (value[0] <= value[1]):
            raise fail("predicate.value", f"between needs [low, high] numbers, not {value!r}")
        value = (float(value[0]), float(value[1]))
    elif value == RELATIVE and than is not None:
        raise fail("predicate.value", f"{RELATIVE!r} is for a single selection, not with than")
    elif value != RELATIVE and not _is_number(value):
        raise fail("predicate.value", f"must be a number or {RELATIVE!r}, not {value!r}")
    return Claim(
        id=claim_id,
        text=raw["text"],
        paper_value=raw["paper_value"],
        selection=selection,
        op=predicate["op"],
        value=value,
        than=than,
    )


def _parse_selection(
    raw: Mapping[str, Any],
    keys: tuple[str, ...],
    base: Mapping[str, Any],
    prefix: str,
    fail: Callable[[str, str], ValueError],
) -> Selection:
    """``base`` overridden by the ``keys`` of ``raw``, validated; errors name ``prefix + key``.
    ``layers`` and ``depth`` are one choice: naming either replaces both of ``base``."""
    if "layers" in raw and "depth" in raw:
        raise fail(f"{prefix}depth", "give layers or depth, not both")
    fields = dict(base) | {key: raw[key] for key in keys if key in raw}
    if "layers" in raw:
        fields["depth"] = None
    if "depth" in raw:
        fields["layers"] = None
    for key in ("figure", "model", "metric", "statistic"):
        if not isinstance(fields.get(key), str):
            raise fail(f"{prefix}{key}", f"must be a string, not {fields.get(key)!r}")
    if fields["statistic"] not in STATISTICS:
        raise fail(f"{prefix}statistic", f"{fields['statistic']!r} not in {STATISTICS}")
    if fields["quantity"] not in QUANTITIES:
        raise fail(f"{prefix}quantity", f"{fields['quantity']!r} not in {QUANTITIES}")
    if fields["statistic"] in (*SIGNIFICANCE, *DROP_STATISTICS) and fields["quantity"] != "delta":
        raise fail(f"{prefix}quantity", f"{fields['statistic']} counts Δs; quantity must be delta")
    panel, series = fields.get("panel"), fields.get("series")
    if panel is not None and not _is_index(panel):
        raise fail(f"{prefix}panel", f"must be a panel index (0, 1, ...), not {panel!r}")
    if series is not None and not isinstance(series, str):
        raise fail(f"{prefix}series", f"must be a series label, not {series!r}")
    for key in ("layers", "heads"):
        indices = fields.get(key)
        if indices is not None:
            if not (isinstance(indices, list | tuple) and indices and all(map(_is_index, indices))):
                raise fail(
                    f"{prefix}{key}", f"must be a non-empty list of indices, not {indices!r}"
                )
            fields[key] = tuple(indices)
    fields["depth"] = _parse_depth(fields.get("depth"), f"{prefix}depth", fail)
    floor = fields.get("floor")
    if floor is not None and not _is_number(floor):
        raise fail(f"{prefix}floor", f"must be a number (a baseline score), not {floor!r}")
    return Selection(**fields)


def _parse_depth(
    depth: Any, key: str, fail: Callable[[str, str], ValueError]
) -> tuple[float, float] | str | None:
    if depth is None or depth == LAST:
        return depth
    if (
        isinstance(depth, list | tuple)
        and len(depth) == 2
        and all(map(_is_number, depth))
        and 0 <= depth[0] < depth[1] <= 1
    ):
        return (float(depth[0]), float(depth[1]))
    raise fail(key, f"must be [low, high] with 0 <= low < high <= 1, or {LAST!r}, not {depth!r}")


def depth_layers(depth: tuple[float, float] | str, num_layers: int) -> tuple[int, ...]:
    """The 0-based layers l of an ``num_layers``-layer model with low <= l / L < high (``depth``
    [low, high]; high 1 takes the last layer), or the last layer alone (``depth`` "last")."""
    if depth == LAST:
        return (num_layers - 1,)
    low, high = depth
    return tuple(layer for layer in range(num_layers) if low <= layer / num_layers < high)


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
    return parse_claims(yaml.safe_load(Path(path).read_text()), path)


def parse_claims(raw: Any, path: Path | str) -> list[Claim]:
    """The claims of a loaded YAML list (``path``: where it came from, for messages)."""
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a list of claims")
    claims = [parse_claim(item) for item in raw]
    ids = [claim.id for claim in claims]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate claim ids {duplicates}")
    return claims


def claim_figures(claims: Iterable[Claim], figure: str, figures: Iterable[str]) -> list[str]:
    """``figure``, then the others of ``figures`` whose CSVs its claims compare with (`than`)."""
    compared = {
        claim.than.figure for claim in claims if claim.figure == figure and claim.than is not None
    }
    return [figure, *sorted(compared.intersection(figures) - {figure})]


@dataclass(frozen=True)
class Shapes:
    """What claims need of each model (by id): its layer count (``depth``) and query heads per
    KV group (``group_share``)."""

    num_layers: Mapping[str, int]
    heads_per_group: Mapping[str, int]


# A selection's statistic, None or why it is not comparable, its series' rows, its units' rows.
Reduced = tuple[float, str | None, pd.DataFrame, pd.DataFrame]


def paired_statistic(
    statistic: str,
    units: pd.DataFrame,
    other: pd.DataFrame,
    quantity: str,
    num_layers: int | None,
) -> float:
    """A statistic of :data:`PAIRED_STATISTICS` over the units (layer, head) both selections
    hold; NaN where none is shared (or, for peak_gap_depth, the model's layer count is unknown)."""
    from ablate.stats import spearman  # scipy: not at the workflow's parse

    paired = units.assign(head=units["head"].fillna(-1)).merge(
        other.assign(head=other["head"].fillna(-1)), on=["layer", "head"], suffixes=("", "_than")
    )
    if not len(paired):
        return math.nan
    own, than = paired[quantity], paired[f"{quantity}_than"]
    if statistic == "spearman":
        return spearman(own, than)
    if statistic == "share_above":
        return float((own > than).mean())
    if num_layers is None:
        return math.nan
    return float(paired.loc[(own - than).idxmax(), "layer"] / num_layers)


def check_claims(
    claims: Iterable[Claim],
    frames: Mapping[str, pd.DataFrame],
    figure_models: Mapping[str, set[str]],
    num_layers: Mapping[str, int] | None = None,
    heads_per_group: Mapping[str, int] | None = None,
) -> pd.DataFrame:
    """One row per claim (per model for ``model: any``): the reproduced statistic (or difference,
    with ``than``) and the verdict.

    ``frames`` maps figure id to its CSV (aggregate.COLUMNS); ``figure_models`` maps figure id to
    the model ids its config draws; ``num_layers`` model id to its layer count (for ``depth``),
    ``heads_per_group`` to its query heads per KV group (for ``group_share``). A
    selection is comparable only if its model is among those of its figure and is the model of
    every selected row; a missing figure or unit (or layer count) gives "not comparable" (and NaN
    when nothing at all was selected), a baseline at the floor "not comparable: baseline at floor".
    """
    shapes = Shapes(num_layers or {}, heads_per_group or {})

    def reduce(claim: Claim, selection: Selection, model: str) -> Reduced:
        return _reduce(claim.id, selection, model, frames, figure_models, shapes)

    rows = []
    for claim in claims:
        for model in _claim_models(claim, frames):
            value, reason, series, units = reduce(claim, claim.selection, model)
            if claim.than is not None:
                other, other_reason, _, other_units = reduce(claim, claim.than, model)
                statistic = claim.selection.statistic
                if statistic in PAIRED_STATISTICS:
                    owner = model if claim.model == ANY_MODEL else claim.model
                    value = paired_statistic(statistic, units, other_units,
                                             claim.selection.quantity,
                                             shapes.num_layers.get(owner))  # fmt: skip
                else:
                    value -= other
                reasons = {reason, other_reason} - {None}
                reason = NOT_COMPARABLE if NOT_COMPARABLE in reasons else next(iter(reasons), None)
            if reason is None and math.isnan(value):
                reason = NOT_COMPARABLE
            verdict = reason
            if reason is None:
                relative = claim.value == RELATIVE
                bound = series["delta"].median(skipna=False) if relative else claim.value
                verdict = "holds" if OPS[claim.op](value, bound) else "does not hold"
            rows.append([claim.id, claim.figure, model, claim.text, claim.paper_value, value,
                         verdict])  # fmt: skip
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def _claim_models(claim: Claim, frames: Mapping[str, pd.DataFrame]) -> list[str]:
    """The claim's model, or for ``model: any`` each model with rows of the claim's metric, panel
    and series in its figure's CSV (``any`` alone where there is none: not comparable)."""
    frame = frames.get(claim.figure)
    if claim.model != ANY_MODEL or frame is None:
        return [claim.model]
    models = sorted(set(_matching_rows(claim.selection, frame)["model"].astype(str)))
    return models or [ANY_MODEL]


def _reduce(
    claim_id: str,
    selection: Selection,
    model: str,
    frames: Mapping[str, pd.DataFrame],
    figure_models: Mapping[str, set[str]],
    shapes: Shapes,
) -> Reduced:
    """The selection's statistic, None or why it is not comparable, and the rows of its series
    and of its units. ``model`` is the one a ``model: any`` selection is checked for (only its
    rows count)."""
    frame = frames.get(selection.figure)
    if frame is None:
        return math.nan, NOT_COMPARABLE, pd.DataFrame(), pd.DataFrame()
    if selection.model == ANY_MODEL:
        frame = frame[frame["model"].astype(str) == model]
    else:
        model = selection.model
    series = _series_rows(claim_id, selection, frame)
    units, complete = _unit_rows(selection, series, shapes.num_layers.get(model))
    if not len(units):
        return math.nan, NOT_COMPARABLE, series, units
    in_config = model in figure_models.get(selection.figure, set())
    value = _statistic(selection, units, series, shapes.heads_per_group.get(model))
    if not (complete and in_config and set(units["model"]) == {model}):
        return value, NOT_COMPARABLE, series, units
    if selection.floor is not None and series["baseline"].max() <= selection.floor:
        return value, AT_FLOOR, series, units
    return value, None, series, units


def _statistic(
    selection: Selection, units: pd.DataFrame, series: pd.DataFrame, heads_per_group: int | None
) -> float:
    if selection.statistic in PAIRED_STATISTICS:  # of two selections: check_claims computes it
        return math.nan
    if selection.statistic == GROUP_SHARE:  # η² of Δ by KV group, over one layer's heads
        if heads_per_group is None or units["head"].isna().any():
            return math.nan
        groups = units["head"].astype(int) // heads_per_group
        total = ((units["delta"] - units["delta"].mean()) ** 2).sum()
        between = units.groupby(groups)["delta"].transform("mean") - units["delta"].mean()
        return float((between**2).sum() / total) if total else math.nan
    drops = units["delta"].clip(upper=0)
    if selection.statistic == DROP_SHARE:  # NaN where the series drops nowhere
        total = series["delta"].clip(upper=0).sum(skipna=False)
        return float(drops.sum(skipna=False) / total) if total else math.nan
    if selection.statistic == HALF_DROP_UNITS:
        if drops.isna().any() or not drops.sum():
            return math.nan
        carried = drops.sort_values().cumsum() / drops.sum()  # largest drops first
        return float(((carried < 0.5).sum() + 1) / len(drops))
    sign = SIGNIFICANCE.get(selection.statistic)
    if sign is None:
        return float(getattr(units[selection.quantity], selection.statistic)(skipna=False))
    if units["p_holm"].isna().any():  # an untested unit: no count could say "none"
        return math.nan
    counted = units["significant"].astype(bool) & (units["delta"] * sign > 0)
    return float(counted.sum())


def _matching_rows(selection: Selection, frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of the selection's metric (and panel, series, where set), of any model."""
    metric = frame["metric"].astype(str)
    if "," not in selection.metric:  # a bare metric name matches any filter
        metric = metric.str.split(",").str[0]
    keep = metric == selection.metric
    if selection.panel is not None:
        keep &= frame["panel"] == selection.panel
    if selection.series is not None:
        keep &= frame["series"] == selection.series
    return frame[keep]


def _series_rows(claim_id: str, selection: Selection, frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of the one (panel, series) the selection's metric/panel/series pick (maybe none)."""
    rows = _matching_rows(selection, frame)
    groups = rows[["panel", "series"]].drop_duplicates()
    if len(groups) > 1:
        found = ", ".join(f"panel {p} {s!r}" for p, s in groups.itertuples(index=False))
        raise ValueError(
            f"claim {claim_id!r}: {selection.figure} has several series for metric "
            f"{selection.metric!r} ({found}); set panel or series"
        )
    return rows


def _unit_rows(
    selection: Selection, rows: pd.DataFrame, num_layers: int | None
) -> tuple[pd.DataFrame, bool]:
    """The rows of those of the selection's units present, and whether every named unit is (a
    ``depth`` names the swept layers in its range: at least one must be; it needs the model's
    ``num_layers``)."""
    complete = True
    if selection.depth is not None:
        if num_layers is None:
            return rows.iloc[:0], False
        rows = rows[rows["layer"].isin(depth_layers(selection.depth, num_layers))]
    if selection.layers is not None:
        complete = set(selection.layers) <= set(rows["layer"])
        rows = rows[rows["layer"].isin(selection.layers)]
    if selection.heads is not None:
        complete &= all(
            set(selection.heads) <= set(layer_rows["head"].dropna())
            for _, layer_rows in rows.groupby("layer")
        )
        rows = rows[rows["head"].isin(selection.heads)]
    return rows, complete and len(rows) > 0
