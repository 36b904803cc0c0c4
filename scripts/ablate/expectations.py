"""What a run must find: per figure, significant drops and claim verdicts
(workflow/config/demo_expected.yaml for the demo), checked on the figure and claims CSVs after the
run, so that a change that silently disables ablations or flattens their effects fails CI.

    python -m ablate.expectations workflow/config/demo_expected.yaml [--results results]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

EXPECTATION_KEYS = ("min_significant_drops", "significant_drop_layers", "claims")


def significant_drops(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["significant"].fillna(False).astype(bool) & (frame["delta"] < 0)]


def check_figure(figure: str, expected: Mapping[str, Any], results: Path) -> list[str]:
    """Failures of one figure's expectations, one line each (empty: all found)."""
    unknown = set(expected) - set(EXPECTATION_KEYS)
    if unknown:
        return [
            f"{figure}: unknown keys {sorted(unknown)} (allowed: {', '.join(EXPECTATION_KEYS)})"
        ]
    csv = results / "aggregate" / f"{figure}.csv"
    if not csv.exists():
        return [f"{figure}: no {csv}; run the figure first"]
    drops = significant_drops(pd.read_csv(csv))
    failures = []
    if len(drops) < expected.get("min_significant_drops", 0):
        failures.append(
            f"{figure}: {len(drops)} significant drops, expected at least "
            f"{expected['min_significant_drops']}"
        )
    missing = sorted(set(expected.get("significant_drop_layers", [])) - set(drops["layer"]))
    if missing:
        failures.append(f"{figure}: no significant drop at layers {missing}")
    if expected.get("claims"):
        verdicts = pd.read_csv(results / "claims" / f"{figure}.csv")
        for claim, verdict in expected["claims"].items():
            found = sorted(set(verdicts.loc[verdicts["claim"] == claim, "verdict"]))
            if found != [verdict]:
                failures.append(f"{figure}: claim {claim}: {found or 'absent'}, expected {verdict}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("expected", type=Path, help="YAML: figure id -> expectations")
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    expected = yaml.safe_load(args.expected.read_text())
    failures = [line for figure, spec in expected.items()
                for line in check_figure(figure, spec, args.results)]  # fmt: skip
    for line in failures:
        print(f"not found: {line}", file=sys.stderr)
    print(f"{args.expected}: {len(expected)} figures, {len(failures)} expectations not met")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
