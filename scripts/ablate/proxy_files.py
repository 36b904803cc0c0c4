"""Reading the baseline's proxy files (ablate.proxy writes them) back, validated: a truncated
or edited file must not pick other layers. Rows are read by their ``layer`` (or ``start`` and
``size``) columns, never by position; each layer (or block) once, every value a number."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

FIX = "a truncated or edited file: delete the baseline's folder and rerun to recompute it"


def _invalid(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem} ({FIX})")


def _read(path: Path, columns: list[str], gaps: tuple[str, ...] = ()) -> pd.DataFrame:
    """The CSV with ``columns`` numbers; those of ``gaps`` may be empty (a proxy the model's
    layout has no value of, e.g. a sublayer's under post-norms)."""
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as error:  # missing, empty, or not CSV
        raise _invalid(path, f"unreadable ({' '.join(str(error).split())[:120]})") from None
    if missing := [c for c in columns if c not in frame]:
        raise _invalid(path, f"no column {', '.join(missing)}")
    values = frame[columns].apply(pd.to_numeric, errors="coerce")
    bad = values.isna() & ~(frame[columns].isna() & values.columns.isin(gaps))
    if bad.any().any():
        row = int(bad.any(axis=1).to_numpy().argmax())
        raise _invalid(path, f"row {row + 1} is not numbers in {', '.join(columns)}")
    return frame.assign(**values)


def read_proxies(
    path: Path,
    num_layers: int,
    columns: tuple[str, ...] = ("block_influence",),
    gaps: tuple[str, ...] = (),
) -> pd.DataFrame:
    """proxies.csv indexed by layer: every layer 0..num_layers-1 once, ``columns`` numbers
    (``gaps``: may be empty)."""
    frame = _read(path, ["layer", *columns], gaps)
    layers = frame["layer"]
    expected = set(range(num_layers))
    if layers.duplicated().any() or (layers % 1).any() or set(layers.astype(int)) != expected:
        absent = sorted(expected - set(layers.astype(int)))
        raise _invalid(
            path,
            f"layers must be 0..{num_layers - 1} once each (missing "
            f"{absent[:5]}{'...' if len(absent) > 5 else ''}; {len(frame)} rows)",
        )
    return frame.astype({"layer": int}).set_index("layer").sort_index()


def read_block_distances(path: Path, num_layers: int) -> dict[tuple[int, int], float]:
    """angular_blocks.csv as {(first layer, block size): distance}, every block of the model's
    ``num_layers`` layers once."""
    frame = _read(path, ["start", "size", "angular_distance"])
    blocks = list(zip(frame["start"].astype(int), frame["size"].astype(int), strict=True))
    expected = {(s, n) for n in range(1, num_layers + 1) for s in range(num_layers - n + 1)}
    if len(blocks) != len(set(blocks)) or set(blocks) != expected:
        raise _invalid(
            path,
            f"blocks must be every (start, size) of {num_layers} layers once "
            f"({len(expected)}; {len(blocks)} rows)",
        )
    return dict(zip(blocks, frame["angular_distance"].astype(float), strict=True))
