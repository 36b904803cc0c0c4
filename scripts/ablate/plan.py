"""GPU-hour planner: what a target will cost before anything runs.

    python -m ablate.plan fig11 [fig12 ...] [--configfile workflow/config/demo.yaml] [--directory .]

The jobs are the evaluation chunks a target needs whose results are not all there yet (what
``snakemake -n`` would run on an unchanged config), costed by :mod:`ablate.cost`. Each
generate-until row also says what the same jobs would cost on the cheapest other backend that
serves the protocol. The total also says what one job per unit would cost.

Tokens are *counted* from the task's real requests (ablate.tokens, cached in
``resources/tokens/<model>/<task>.json``) once the model is downloaded and the task prefetched
(``snakemake --until prefetch_task download_model``), else a *prior*; generations are the whole
budget until a unit of the task has run, then its *measured* mean. A rate is *calibrated* from
the Snakemake benchmark TSVs of evaluations that already ran on that device and backend, else
it is a *prior* (each column of the table says which).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ablate.aggregate import result_path
from ablate.backends import scores_given_text, serving
from ablate.config import (
    Chunk,
    ConfigError,
    evaluation_chunks,
    figure_evaluations,
    load_config,
    task_settings,
)
from ablate.cost import (
    Rates,
    TaskCost,
    calibrated_rates,
    chunk_seconds,
    device_kind,
    gpu_check_rates,
    prior_rates,
)
from ablate.io import write_atomically
from ablate.paths import (
    DOWNLOAD_RECORD,
    EVALUATIONS,
    GPU_CHECK,
    MODEL_DIR,
    TASK_DIR,
    TASK_RECORD,
)
from ablate.tokens import (
    TaskTokens,
    count_task_tokens,
    generated_tokens,
    model_counts_path,
    offline_twin,
    read_task_tokens,
    scaled,
    stand_in_counts_path,
    stand_in_dir,
    stand_in_scale,
)


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
    results = Path(workdir) / EVALUATIONS
    return [
        chunk
        for chunk in evaluation_chunks(config)
        if any((chunk.model, chunk.task, a) in needed for a in chunk.ids)
        and not all(result_path(results, chunk.model, chunk.task, a).exists() for a in chunk.ids)
    ]


class TaskCosts:
    """The tokens of each (model, task) of a config in a working directory: counted from the
    task's requests where the model and the task are there (and cached), else the prior;
    generations measured where units of the task have run."""

    def __init__(self, config: dict[str, Any], workdir: Path, stand_in: bool = True) -> None:
        self.config, self.workdir, self.stand_in = config, Path(workdir), stand_in
        self.data_dir = str(self.workdir / config["data_dir"])

    def model_dir(self, model_id: str) -> Path | None:
        folder = self.workdir / MODEL_DIR.format(model=model_id)
        return folder if (folder / DOWNLOAD_RECORD).exists() else None

    def sweep_off(self, model_id: str) -> bool:
        """Whether the download step found that the sweep cannot reproduce the model (its
        log-likelihood units then run one lm-eval evaluation each)."""
        folder = self.model_dir(model_id)
        return bool(folder and json.loads((folder / DOWNLOAD_RECORD).read_text()).get("sweep_off"))

    def counts(self, model_id: str, task_id: str) -> tuple[TaskTokens, str] | None:
        """The task's tokens and how they were counted: with the model's own tokenizer where
        the model and the task are here, else (``stand_in``) the offline twin of the task
        counted with SmolLM2's tokenizer and scaled to the model's vocabulary."""
        settings = task_settings(self.config, task_id)
        cached = model_counts_path(self.workdir, model_id, task_id, settings)
        if counts := read_task_tokens(cached, settings):
            return counts, "counted"
        model_dir = self.model_dir(model_id)
        if model_dir and (self.workdir / TASK_RECORD.format(task=task_id)).exists():
            counts = count_task_tokens(model_dir, settings, self.data_dir)
            write_atomically(cached, json.dumps(asdict(counts)))
            return counts, "counted"
        twin = offline_twin(settings) if self.stand_in else None
        if twin is None:
            return None
        cached = stand_in_counts_path(self.workdir, task_id, twin)
        if not (counts := read_task_tokens(cached, twin)):
            print(f"counting the tokens of task {task_id} (once) ...", file=sys.stderr)
            try:
                counts = count_task_tokens(stand_in_dir(self.workdir), twin, self.data_dir)
            except OSError:  # a task that still needs the hub: the prior
                return None
            write_atomically(cached, json.dumps(asdict(counts)))
        label, factor = stand_in_scale(self.config["models"][model_id], twin["lm_eval_task"])
        return scaled(counts, factor), label

    def generated_mean(self, model_id: str, task_id: str) -> float | None:
        model_dir = self.model_dir(model_id)
        units = self.workdir / EVALUATIONS / TASK_DIR.format(model=model_id, task=task_id)
        finished = sorted(units.glob("*/results.json"))
        if model_dir is None or not finished:
            return None
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return generated_tokens(tokenizer, [path.with_name("samples.jsonl") for path in finished])

    @functools.cache  # noqa: B019 (one planner run, a handful of keys)
    def __call__(self, model_id: str, task_id: str) -> TaskCost:
        task = self.config["tasks"][task_id]
        generated = None
        if task["protocol"] == "generate_until":
            generated = self.generated_mean(model_id, task_id)
        counts, tokens = self.counts(model_id, task_id) or (None, "prior")
        return TaskCost.of(task, counts, generated, tokens)


def jobs_seconds(
    model: dict,
    task: dict,
    chunks: list[Chunk],
    rates: Rates,
    reuse: bool,
    backend: str,
    cost: TaskCost,
    one_job_per_unit: bool = False,
) -> dict[Chunk, float]:
    """Seconds of each chunk's job on ``backend`` (or of one job per unit of the chunk)."""
    return {
        chunk: sum(
            chunk_seconds(model, task, units, rates, reuse, backend, cost)
            for units in (
                [(a,) for a in chunk.ablations] if one_job_per_unit else [chunk.ablations]
            )
        )
        for chunk in chunks
    }


def plan(
    targets: list[str], config: dict[str, Any], workdir: Path, stand_in: bool = True
) -> list[dict[str, Any]]:
    """One row per (figure, model, task) of the evaluation jobs still to run (``stand_in``:
    count tokens with the stand-in tokenizer where the model or the task is not here).

    A job two figures share (a common baseline) appears under both; ``total_row`` counts it once.
    """
    planned = planned_chunks(targets, config, workdir)
    groups: dict[tuple[str, str, str], list[Chunk]] = defaultdict(list)
    for figure in figure_targets(config, targets):
        needed = set(figure_evaluations(config, figure))
        for chunk in planned:
            if any((chunk.model, chunk.task, a) in needed for a in chunk.ids):
                groups[(figure, chunk.model, chunk.task)].append(chunk)
    return cost_rows(groups, config, workdir, stand_in)


def dry_run_plan(job_rules: set[str], config: dict[str, Any], workdir: Path) -> str:
    """The GPU-hour line of the evaluation jobs among a dry run's ``job_rules`` (rule names)."""
    groups: dict[tuple[str, str, str], list[Chunk]] = defaultdict(list)
    for chunk in evaluation_chunks(config):
        if chunk.name in job_rules:
            groups[("dry run", chunk.model, chunk.task)].append(chunk)
    if not groups:
        return "GPU-hour plan: no evaluation job to run"
    rows = cost_rows(groups, config, workdir)
    tokens = ", ".join(sorted({row["tokens"].split()[0] for row in rows}))
    rates = ", ".join(sorted({row["rate"] for row in rows}))
    line = f"GPU-hour plan: {total_line(total_row(rows))} (tokens: {tokens}; rates: {rates})"
    ordered = [a.id for chunks in groups.values() for c in chunks for a in c.ablations if a.order]
    if ordered:  # costed as full passes: their first removed layer is not known yet
        line += (
            f"\n{len(ordered)} layer_set units ({ordered[0]}, ...) pick their layers from their "
            "baseline's proxies when they run, after the baseline job (costed as full passes)"
        )
    return line


def cost_rows(
    groups: dict[tuple[str, str, str], list[Chunk]],
    config: dict[str, Any],
    workdir: Path,
    stand_in: bool = True,
) -> list[dict[str, Any]]:
    """One row per (figure, model, task) group of chunks, costed."""
    reuse = config["evaluation"]["prefix_reuse"]
    costs = TaskCosts(config, workdir, stand_in)
    calibrated = calibrated_rates(config, workdir, lambda chunk: costs(chunk.model, chunk.task))
    measured = gpu_check_rates(Path(workdir) / GPU_CHECK)
    rates = prior_rates() | measured | calibrated
    rows = []
    for (figure, model_id, task_id), chunks in groups.items():
        model, task = config["models"][model_id], config["tasks"][task_id]
        backend, gpus = chunks[0].backend, model["gpus"]
        device = device_kind(model)
        phases = ("prefill",) if scores_given_text(task["protocol"]) else ("prefill", "decode")
        cost = costs(model_id, task_id)
        model_reuse = reuse and not costs.sweep_off(model_id)
        seconds = jobs_seconds(model, task, chunks, rates, model_reuse, backend, cost)
        per_unit = jobs_seconds(model, task, chunks, rates, False, backend, cost, True)
        hours = sum(seconds.values()) / 3600
        others = {
            other: sum(jobs_seconds(model, task, chunks, rates, model_reuse, other, cost).values())
            / 3600
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
            "rate": rate_source((device, backend), phases, calibrated, measured),
            "tokens": cost.tokens, "generation": cost.generation or None,
            "_jobs": seconds, "_per_unit": per_unit,
        })  # fmt: skip
    return rows


def rate_source(
    kind: tuple[str, str], phases: tuple[str, ...], calibrated: Rates, measured: Rates
) -> str:
    """Where a row's rates come from: finished jobs, make gpu-check, or the priors."""
    for name, rates in (("calibrated", calibrated), ("gpu-check", measured)):
        if all((*kind, phase) in rates for phase in phases):
            return name
    return "prior"


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


def total_line(total: dict[str, float]) -> str:
    return (f"{total['jobs']} evaluation jobs ({total['units']} units), "
            f"{total['gpu_hours']:.1f} GPU-hours, {total['job_hours']:.1f} job-hours (one job "
            f"per unit without prefix reuse: {total['gpu_hours_one_job_per_unit']:.1f} "
            "GPU-hours)")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help="figure targets, e.g. fig11, or all")
    parser.add_argument("--configfile", type=Path, default=Path("config.yaml"))
    parser.add_argument("--directory", type=Path, default=Path(), help="workflow working dir")
    parser.add_argument("--dry-run", type=Path, metavar="JOBS",
                        help="the total only, of a JSON {config, jobs: rule names} that "
                        "`snakemake -n` writes")  # fmt: skip
    args = parser.parse_args(argv)
    if args.dry_run:
        planned = json.loads(args.dry_run.read_text())
        print(dry_run_plan(set(planned["jobs"]), planned["config"], args.directory))
        return
    if not args.targets:
        parser.error("name a figure target, or all")
    import pandas as pd

    try:
        rows = plan(args.targets, load_config(args.configfile), args.directory)
    except ConfigError as error:
        sys.exit(f"config error: {error}")
    if not rows:
        print("nothing to run: every evaluation of these targets is already done")
        return
    print(pd.DataFrame(rows).drop(columns=["_jobs", "_per_unit"]).to_string(index=False))
    print(f"\ntotal: {total_line(total_row(rows))}; downloads, aggregation, claims and plots "
          "run locally")  # fmt: skip


if __name__ == "__main__":
    main()
