"""GPU-hour planner: what a target will cost before anything runs.

    python -m ablate.plan fig11 [fig12 ...] [--configfile workflow/config/demo.yaml] [--directory .]

The jobs are the evaluation chunks a target needs whose results are not all there yet (what
``snakemake -n`` would run on an unchanged config), costed by :mod:`ablate.cost`. Each
generate-until row also says what the same jobs would cost on the cheapest other backend that
serves the protocol. The total also says what one job per unit would cost. Measured by
``make bench`` (SmolLM2, CPU): a 30-layer log-likelihood sweep as one job takes 0.36x the time of
one job per layer, a last-layer head sweep 0.12x, a generate-until layer sweep 0.35x, and a chunk
of 8 generate-until layers on the vLLM backend 0.22x the HF backend's time, with identical scores.
A rate is *calibrated* from the Snakemake benchmark TSVs of evaluations that already ran on that
device and backend, else it is a *prior* (stated in the table).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from ablate.aggregate import result_path
from ablate.backends import serving
from ablate.config import (
    Chunk,
    ConfigError,
    evaluation_chunks,
    figure_evaluations,
    load_config_file,
    validate_config,
)
from ablate.cost import Rates, calibrated_rates, chunk_seconds, device_kind, prior_rates


def load_config(configfile: Path) -> dict[str, Any]:
    """The config as the workflow sees it: validated, the schema's defaults filled in; a key
    given twice or a syntax error is a ConfigError naming the file and line."""
    config = load_config_file(configfile)
    validate_config(config)
    return config


def figure_targets(config: dict[str, Any], targets: list[str]) -> list[str]:
    if "all" in targets:
        return list(config["figures"])
    if unknown := [t for t in targets if t not in config["figures"]]:
        raise ConfigError(
            f"no figure {', '.join(unknown)} (allowed: all, {', '.join(config['figures'])})"
        )
    return targets


def planned_chunks(targets: list[str], config: dict[str, Any], workdir: Path) -> list[Chunk]:
    """The evaluation jobs the targets need whose per-unit results are not all in ``workdir``."""
    needed = {e for f in figure_targets(config, targets) for e in figure_evaluations(config, f)}
    results = Path(workdir) / "results" / "evaluate"
    return [
        chunk
        for chunk in evaluation_chunks(config)
        if any((chunk.model, chunk.task, a) in needed for a in chunk.ids)
        and not all(result_path(results, chunk.model, chunk.task, a).exists() for a in chunk.ids)
    ]


def jobs_seconds(
    model: dict,
    task: dict,
    chunks: list[Chunk],
    rates: Rates,
    reuse: bool,
    backend: str,
    one_job_per_unit: bool = False,
) -> dict[Chunk, float]:
    """Seconds of each chunk's job on ``backend`` (or of one job per unit of the chunk)."""
    return {
        chunk: sum(
            chunk_seconds(model, task, units, rates, reuse, backend)
            for units in (
                [(a,) for a in chunk.ablations] if one_job_per_unit else [chunk.ablations]
            )
        )
        for chunk in chunks
    }


def plan(targets: list[str], config: dict[str, Any], workdir: Path) -> list[dict[str, Any]]:
    """One row per (figure, model, task) of the evaluation jobs still to run.

    A job two figures share (a common baseline) appears under both; ``total_row`` counts it once.
    """
    reuse = config["evaluation"]["prefix_reuse"]
    calibrated = calibrated_rates(config, Path(workdir) / "benchmarks" / "evaluate")
    rates = prior_rates() | calibrated
    planned = planned_chunks(targets, config, workdir)
    groups: dict[tuple, list[Chunk]] = defaultdict(list)
    for figure in figure_targets(config, targets):
        needed = set(figure_evaluations(config, figure))
        for chunk in planned:
            if any((chunk.model, chunk.task, a) in needed for a in chunk.ids):
                groups[(figure, chunk.model, chunk.task)].append(chunk)
    rows = []
    for (figure, model_id, task_id), chunks in groups.items():
        model, task = config["models"][model_id], config["tasks"][task_id]
        backend, gpus = chunks[0].backend, model["gpus"]
        device = device_kind(model)
        phases = ("prefill",) if task["protocol"] == "loglikelihood" else ("prefill", "decode")
        seconds = jobs_seconds(model, task, chunks, rates, reuse, backend)
        per_unit = jobs_seconds(model, task, chunks, rates, reuse, backend, one_job_per_unit=True)
        hours = sum(seconds.values()) / 3600
        others = {
            other: sum(jobs_seconds(model, task, chunks, rates, reuse, other).values()) / 3600
            for other in serving(task["protocol"])
            if other != backend
        }
        cheapest = min(others, key=others.get) if others else None
        rows.append({
            "figure": figure, "model": model_id, "task": task_id, "backend": backend,
            "jobs": len(chunks), "units": sum(len(c.ablations) for c in chunks),
            "gpus_per_job": gpus,
            "minutes_per_job": round(sum(seconds.values()) / len(chunks) / 60, 1),
            "gpu_hours": round(hours * gpus, 2), "job_hours": round(hours, 2),
            "other_backend": cheapest,
            "gpu_hours_other_backend": round(others[cheapest] * gpus, 2) if cheapest else None,
            "rate": "calibrated" if all((device, backend, p) in calibrated for p in phases) else "prior",
            "_jobs": seconds, "_per_unit": per_unit,
        })  # fmt: skip
    return rows


def total_row(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Jobs and hours over the union of the rows' jobs (shared ones once)."""
    cost: dict[Chunk, tuple[float, float, float]] = {}
    for row in rows:
        for chunk, seconds in row["_jobs"].items():
            gpus = row["gpus_per_job"]
            cost[chunk] = (
                seconds / 3600 * gpus,
                seconds / 3600,
                row["_per_unit"][chunk] / 3600 * gpus,
            )
    return {
        "jobs": len(cost),
        "units": sum(len(chunk.ablations) for chunk in cost),
        "gpu_hours": sum(gpu for gpu, _, _ in cost.values()),
        "job_hours": sum(hours for _, hours, _ in cost.values()),
        "gpu_hours_one_job_per_unit": sum(naive for _, _, naive in cost.values()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", help="figure targets, e.g. fig11, or all")
    parser.add_argument("--configfile", type=Path, default=Path("config.yaml"))
    parser.add_argument("--directory", type=Path, default=Path(), help="workflow working dir")
    args = parser.parse_args(argv)
    import pandas as pd

    try:
        rows = plan(args.targets, load_config(args.configfile), args.directory)
    except ConfigError as error:
        sys.exit(f"config error: {error}")
    if not rows:
        print("nothing to run: every evaluation of these targets is already done")
        return
    print(pd.DataFrame(rows).drop(columns=["_jobs", "_per_unit"]).to_string(index=False))
    total = total_row(rows)
    print(f"\ntotal: {total['jobs']} evaluation jobs ({total['units']} units), "
          f"{total['gpu_hours']:.1f} GPU-hours, "
          f"{total['job_hours']:.1f} job-hours (one job per unit without prefix reuse: "
          f"{total['gpu_hours_one_job_per_unit']:.1f} GPU-hours); downloads, aggregation, claims "
          "and plots run locally")  # fmt: skip


if __name__ == "__main__":
    main()
