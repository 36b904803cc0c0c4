"""The cost model of evaluation jobs: processed tokens x model size x seconds per (token x
billion parameters), one rate per (device kind, backend, phase), with log-likelihood chunks
charged only the layers the shared-prefix sweep runs. The workflow sets each job's SLURM runtime
from it; the planner (ablate.plan) prints it per figure. Rates are the backends' priors
(ablate.backends) unless calibrated from the benchmark TSVs of jobs that already ran.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from ablate.ablations import Ablation
from ablate.backends import BACKENDS
from ablate.config import evaluation_chunks

# Documents per task when no limit is set (full test/validation splits).
KNOWN_DOCS = {
    "mmlu": 14042, "mmlu_continuation": 14042, "mmlu_generative": 14042, "hellaswag": 10042,
    "mathqa": 2985, "openbookqa": 500, "openbookqa_open": 500, "gsm8k": 1319, "gsm8k_cot": 1319,
    "kv_retrieval": 500, "kv_retrieval_gen": 500,
}  # fmt: skip
DEFAULT_DOCS = 1000
PROMPT_TOKENS = 400  # per document (few-shot prompts are longer; a prior, not a measurement)
OPTIONS = 4  # multiple-choice options, each scored with its own forward pass

Rates = dict[tuple[str, str, str], float]  # (device kind, backend, phase) -> s / (token x B)


def prior_rates() -> Rates:
    return {
        (device, name, phase): rate
        for name, backend in BACKENDS.items()
        for (device, phase), rate in backend.prior_rates.items()
    }


def device_kind(model: dict[str, Any]) -> str:
    return "cpu" if model["device"] == "cpu" else "cuda"


def tokens(task: dict[str, Any]) -> tuple[float, float]:
    """(prompt, generated) tokens of one evaluation; generation assumes the whole budget."""
    name = task["lm_eval_task"].removesuffix("_local")
    docs = task.get("limit") or KNOWN_DOCS.get(name, DEFAULT_DOCS)
    if task["protocol"] == "loglikelihood":
        return docs * PROMPT_TOKENS * OPTIONS, 0.0
    return docs * PROMPT_TOKENS, docs * (task.get("gen_kwargs") or {}).get("max_gen_toks", 256)


def forward_passes(
    model: dict, task: dict, ablations: tuple[Ablation, ...], prefix_reuse: bool
) -> float:
    """Full-model prompt passes a chunk costs. With prefix reuse (log-likelihood chunks), the
    unablated model runs up to the highest first-changed layer once, and each unit runs only
    from its first changed layer up (ablate.sweep)."""
    if not (prefix_reuse and task["protocol"] == "loglikelihood" and len(ablations) > 1):
        return float(len(ablations))
    layers = model["num_layers"]
    firsts = [ablation.first_changed_layer(layers) for ablation in ablations]
    return (max(firsts) + sum(layers - first for first in firsts)) / layers


def chunk_seconds(
    model: dict,
    task: dict,
    ablations: tuple[Ablation, ...],
    rates: Rates,
    prefix_reuse: bool = True,
    backend: str = "hf",
) -> float:
    """Wall seconds of one evaluation job: start-up, then prompt and generated tokens at ``rates``."""
    device = device_kind(model)
    prompt, generated = tokens(task)
    passes = forward_passes(model, task, ablations, prefix_reuse and backend == "hf")
    work = passes * prompt * rates[(device, backend, "prefill")]
    if generated:  # a log-likelihood-only backend has no decode rate
        work += len(ablations) * generated * rates[(device, backend, "decode")]
    return BACKENDS[backend].job_overhead_s[device] + work * model["params_b"]


def calibrated_rates(config: dict[str, Any], benchmarks: Path) -> Rates:
    """Rates fitted to finished jobs' benchmark TSVs (those of the config's current chunks):
    prefill from log-likelihood jobs, then decode from generation jobs net of their prefill
    at their backend's prefill rate (calibrated, else its prior)."""
    reuse = config["evaluation"]["prefix_reuse"]
    priors = prior_rates()
    fitted: dict[tuple[str, str, str], list[float]] = defaultdict(list)
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
            overhead = BACKENDS[chunk.backend].job_overhead_s[device]
            net = (wall - overhead) / model["params_b"]
            if phase == "prefill":
                fitted[(device, chunk.backend, phase)].append(net / (passes * prompt))
            else:
                prefill = fitted.get((device, chunk.backend, "prefill"))
                rate = (
                    sum(prefill) / len(prefill)
                    if prefill
                    else priors[(device, chunk.backend, "prefill")]
                )
                net -= passes * prompt * rate
                fitted[(device, chunk.backend, phase)].append(
                    net / (len(chunk.ablations) * generated)
                )
    return {key: max(sum(values) / len(values), 0.0) for key, values in fitted.items()}
