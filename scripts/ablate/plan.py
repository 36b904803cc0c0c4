"""GPU-hour planner: what a target will cost before anything runs.

    python -m ablate.plan fig11 [fig12 ...] [--configfile workflow/config/demo.yaml] [--directory .]

The jobs are exactly those of ``snakemake -n`` for the same targets (finished jobs excluded). Each
evaluation job is costed as processed tokens x model size x seconds per (token x billion params),
one rate per (device, protocol). A rate is *calibrated* from the Snakemake benchmark TSVs of
evaluations that already ran on that device, else it is a *prior* (stated in the table).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Documents per task when no prefetch record exists yet (full test/validation splits).
KNOWN_DOCS = {
    "mmlu": 14042, "mmlu_continuation": 14042, "mmlu_generative": 14042, "hellaswag": 10042,
    "mathqa": 2985, "openbookqa": 500, "openbookqa_open": 500, "gsm8k": 1319, "gsm8k_cot": 1319,
    "kv_retrieval": 500, "kv_retrieval_gen": 500,
}  # fmt: skip
DEFAULT_DOCS = 1000
PROMPT_TOKENS = 400  # per document (few-shot prompts are longer; a prior, not a measurement)
OPTIONS = 4  # multiple-choice options, each scored with its own forward pass
# Seconds per (token x billion parameters), for prompt tokens (prefill, scored in parallel) and
# generated tokens (decoded one step at a time). GPU: H100 bf16 priors; CPU: SmolLM2 on 2 cores.
PRIOR_RATE = {
    ("cuda", "prefill"): 1 / (40_000 * 1.0),  # ~5k tok/s on an 8B model
    ("cuda", "decode"): 1 / (8_000 * 1.0),  # ~1k new tok/s at batch 32 on an 8B model
    ("cpu", "prefill"): 1 / (500 * 0.135),  # ~500 tok/s for SmolLM2-135M on one core
    ("cpu", "decode"): 1 / (60 * 0.135),
}
# Seconds of start-up, model load and task build per job (CPU: measured for SmolLM2; GPU: prior).
JOB_OVERHEAD_S = {"cpu": 5.0, "cuda": 60.0}


@dataclass(frozen=True)
class Evaluation:
    model: str
    task: str
    ablation: str


SNAKEFILE = Path(__file__).resolve().parents[2] / "Snakefile"


def planned_evaluations(targets: list[str], configfile: Path, workdir: Path) -> list[Evaluation]:
    """The evaluate_ablation jobs ``snakemake -n`` would run, parsed from its job listing."""
    command = [
        sys.executable, "-m", "snakemake", "-n", *targets, "--snakefile", str(SNAKEFILE),
        "--directory", str(workdir), "--configfile", str(configfile.resolve()),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(result.stdout + result.stderr)
    blocks = re.split(r"\n(?=(?:local)?rule \w+:)", result.stdout)
    evaluations = []
    for block in blocks:
        if block.startswith("rule evaluate_ablation:"):
            wildcards = dict(
                re.findall(r"(\w+)=([^,\s]+)", block.split("wildcards:")[1].split("\n")[0])
            )
            evaluations.append(
                Evaluation(wildcards["model"], wildcards["task"], wildcards["ablation"])
            )
    return evaluations


def device_kind(model: dict[str, Any]) -> str:
    return "cpu" if model.get("device", "cpu") == "cpu" else "cuda"


def tokens(task: dict[str, Any]) -> tuple[float, float]:
    """(prompt, generated) tokens of one evaluation; generation assumes the whole budget."""
    name = task["lm_eval_task"].removesuffix("_local")
    docs = task.get("limit") or KNOWN_DOCS.get(name, DEFAULT_DOCS)
    if task["protocol"] == "loglikelihood":
        return docs * PROMPT_TOKENS * OPTIONS, 0.0
    return docs * PROMPT_TOKENS, docs * (task.get("gen_kwargs") or {}).get("max_gen_toks", 256)


def estimated_seconds(model: dict, task: dict, rates: dict) -> float:
    """Wall seconds of one evaluation job: start-up plus prompt and generated tokens at ``rates``."""
    device = device_kind(model)
    prompt, generated = tokens(task)
    work = prompt * rates[(device, "prefill")] + generated * rates[(device, "decode")]
    return JOB_OVERHEAD_S[device] + work * model["params_b"]


def calibrated_rates(config: dict[str, Any], benchmarks: Path) -> dict[tuple[str, str], float]:
    """Rates fitted to finished evaluations' benchmark TSVs: prefill from log-likelihood jobs,
    then decode from generation jobs net of their (calibrated or prior) prefill."""
    observed: dict[tuple[str, str], list[tuple[float, dict, dict]]] = defaultdict(list)
    for model_id, model in config["models"].items():
        for task_id, task in config["tasks"].items():
            for tsv in (benchmarks / model_id / task_id).glob("*.tsv"):
                wall = float(tsv.read_text().splitlines()[1].split("\t")[0])
                phase = "prefill" if task["protocol"] == "loglikelihood" else "decode"
                observed[(device_kind(model), phase)].append((wall, model, task))
    rates: dict[tuple[str, str], float] = {}
    for phase in ("prefill", "decode"):
        for (device, seen_phase), runs in observed.items():
            if seen_phase != phase:
                continue
            fitted = []
            for wall, model, task in runs:
                prompt, generated = tokens(task)
                net = wall - JOB_OVERHEAD_S[device]
                if phase == "prefill":
                    fitted.append(net / (prompt * model["params_b"]))
                else:
                    prefill = rates.get((device, "prefill"), PRIOR_RATE[(device, "prefill")])
                    net -= prompt * model["params_b"] * prefill
                    fitted.append(net / (generated * model["params_b"]))
            rates[(device, phase)] = max(sum(fitted) / len(fitted), 0.0)
    return rates


def plan(targets: list[str], configfile: Path, workdir: Path) -> list[dict[str, Any]]:
    """One row per (figure, model, task) of the evaluations still to run.

    An evaluation two figures share (a common baseline) appears under both; ``total_row``
    counts it once.
    """
    from ablate.config import figure_evaluations

    config = yaml.safe_load(configfile.read_text())
    calibrated = calibrated_rates(config, workdir / "benchmarks" / "evaluate")
    rates = PRIOR_RATE | calibrated
    planned = set(planned_evaluations(targets, configfile, workdir))
    figures = (
        list(config["figures"])
        if "all" in targets
        else [t for t in targets if t in config["figures"]]
    )
    groups: dict[tuple, list[Evaluation]] = defaultdict(list)
    for figure in figures:
        for evaluation in (Evaluation(*e) for e in figure_evaluations(config, figure)):
            if evaluation in planned:
                groups[(figure, evaluation.model, evaluation.task)].append(evaluation)
    rows = []
    for (figure, model_id, task_id), jobs in groups.items():
        model, task = config["models"][model_id], config["tasks"][task_id]
        device = device_kind(model)
        phases = ("prefill",) if task["protocol"] == "loglikelihood" else ("prefill", "decode")
        per_job = estimated_seconds(model, task, rates)
        hours = per_job * len(jobs) / 3600
        rows.append({
            "figure": figure, "rule": "evaluate_ablation", "model": model_id, "task": task_id,
            "jobs": len(jobs), "gpus_per_job": model.get("gpus", 0),
            "minutes_per_job": round(per_job / 60, 1),
            "gpu_hours": round(hours * model.get("gpus", 0), 2), "job_hours": round(hours, 2),
            "rate": "calibrated" if all((device, p) in calibrated for p in phases) else "prior",
            "_jobs": jobs,
        })  # fmt: skip
    return rows


def total_row(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Jobs and hours over the union of the rows' evaluations (shared ones once)."""
    cost: dict[Evaluation, tuple[float, float]] = {}
    for row in rows:
        per_job_hours = row["job_hours"] / row["jobs"]
        for job in row["_jobs"]:
            cost[job] = (per_job_hours * row["gpus_per_job"], per_job_hours)
    return {
        "jobs": len(cost),
        "gpu_hours": sum(gpu for gpu, _ in cost.values()),
        "job_hours": sum(hours for _, hours in cost.values()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", help="figure targets, e.g. fig11, or all")
    parser.add_argument("--configfile", type=Path, default=Path("config.yaml"))
    parser.add_argument("--directory", type=Path, default=Path(), help="workflow working dir")
    args = parser.parse_args(argv)
    import pandas as pd

    rows = plan(args.targets, args.configfile, args.directory)
    if not rows:
        print("nothing to run: every evaluation of these targets is already done")
        return
    print(pd.DataFrame(rows).drop(columns="_jobs").to_string(index=False))
    total = total_row(rows)
    print(f"\ntotal: {total['jobs']} evaluation jobs, {total['gpu_hours']:.1f} GPU-hours, "
          f"{total['job_hours']:.1f} job-hours; downloads, aggregation and plots run locally")  # fmt: skip


if __name__ == "__main__":
    main()
