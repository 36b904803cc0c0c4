"""The cost model of evaluation jobs: tokens a job computes x model size x seconds per (token x
billion parameters), one rate per (device kind, backend, phase: prefill, decode).

Tokens are the task's real requests where they were counted (ablate.tokens, written by the
planner beside the prefetched task), else a flat prior per document. A log-likelihood chunk is
charged what the shared-prefix sweep computes: each context once for its options, and only the
layers each unit runs. A generate-until chunk is charged its whole generation budget until a
unit of it has run, then the mean tokens those units generated. The workflow sets each job's
SLURM runtime from it; the planner (ablate.plan) prints it per figure. Rates are the backends'
priors (ablate.backends, sources stated there) unless calibrated from the benchmark TSVs of jobs
that already ran, per token and per phase, so a small run calibrates a full one.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablate.ablations import Ablation
from ablate.anatomy import CONTEXT_SHARING_KERNELS
from ablate.backends import BACKENDS, scores_given_text
from ablate.config import Chunk, evaluation_chunks
from ablate.paths import BENCHMARK
from ablate.tokens import TaskTokens

# Documents per task when no limit is set (full test/validation splits).
KNOWN_DOCS = {
    "mmlu": 14042, "mmlu_continuation": 14042, "mmlu_generative": 14042, "hellaswag": 10042,
    "mathqa": 2985, "openbookqa": 500, "openbookqa_open": 500, "gsm8k": 1319, "gsm8k_cot": 1319,
    "kv_retrieval": 500, "kv_retrieval_gen": 500, "wikitext": 62,
}  # fmt: skip
DEFAULT_DOCS = 1000
# Uncounted tasks only: tokens per document, each of 4 options a full sequence (a prior).
PROMPT_TOKENS, OPTIONS = 400, 4
# Uncounted perplexity tasks: tokens per document, scored once. WikiText-2's test split has
# 245,569 words (Merity et al. 2016) on 62 pages; at ~1.2 tokens per word, ~4,700 per page.
DOCUMENT_TOKENS = {"wikitext": 4_700}

Rates = dict[tuple[str, str, str], float]  # (device kind, backend, phase) -> s / (token x B)


@dataclass(frozen=True)
class TaskCost:
    """Tokens of one unit of a task: log-likelihood (per full pass: each context once for its
    options, and every option with its own context) or generate-until (prompt, of which vLLM's
    prefix cache serves ``prompt_cached``, and generated)."""

    shared: float
    sequences: float
    prompt: float
    generated: float
    tokens: str  # "counted" (the real requests), "stand-in ..." (scaled) or "prior"
    generation: str = ""  # generate-until: "measured" (mean of finished units) or "budget"
    prompt_cached: float = 0.0

    @classmethod
    def of(
        cls,
        task: dict[str, Any],
        counts: TaskTokens | None,
        generated_mean: float | None = None,
        tokens: str = "counted",
    ) -> TaskCost:
        """From the requests counted as ``tokens`` says (``counts``), else the prior; generation
        at ``generated_mean`` tokens per document once measured, else the whole budget."""
        if counts is None:
            name = task["lm_eval_task"].removesuffix("_local")
            docs = task.get("limit") or KNOWN_DOCS.get(name, DEFAULT_DOCS)
            budget = docs * (task.get("gen_kwargs") or {}).get("max_gen_toks", 256)
            shared = sequences = docs * PROMPT_TOKENS * OPTIONS  # no context shared
            if task["protocol"] == "loglikelihood_rolling":  # whole documents, once each
                shared = sequences = docs * DOCUMENT_TOKENS.get(name, PROMPT_TOKENS)
            prompt, cached, tokens = docs * PROMPT_TOKENS, 0.0, "prior"
        else:
            docs, budget = counts.documents, counts.budget
            shared, sequences, prompt = counts.shared, counts.sequences, counts.prompt
            # vLLM's automatic prefix caching (on by default) computes the few-shot examples
            # every prompt starts with once per batch; the others find them cached.
            batches = -(-docs // task.get("batch_size", 16))
            cached = counts.prompt_common * (docs - batches)
        if scores_given_text(task["protocol"]):
            return cls(shared, sequences, 0.0, 0.0, tokens)
        if generated_mean is None:
            return cls(0.0, 0.0, prompt, budget, tokens, "budget", cached)
        return cls(0.0, 0.0, prompt, generated_mean * docs, tokens, "measured", cached)


def prior_rates() -> Rates:
    return {
        (device, name, phase): rate
        for name, backend in BACKENDS.items()
        for (device, phase), rate in backend.prior_rates.items()
    }


def gpu_check_rates(path: Path) -> Rates:
    """The prefill rate ``make gpu-check`` measured on this cluster's GPU (none: no file, or a
    tiny-shape run, which measures nothing of the paper models)."""
    if not path.exists() or (report := json.loads(path.read_text()))["tiny"]:
        return {}
    return {tuple(key.split("/")): rate for key, rate in report["rates"].items()}


def device_kind(model: dict[str, Any]) -> str:
    return "cpu" if model["device"] == "cpu" else "cuda"


def forward_passes(
    model: dict, task: dict, ablations: tuple[Ablation, ...], prefix_reuse: bool
) -> float:
    """Full-model passes a chunk costs. With prefix reuse (log-likelihood chunks), the
    unablated model runs up to the highest first-changed layer once, and each unit runs only
    from its first changed layer up, a skipped layer excluded (ablate.sweep)."""
    if not (prefix_reuse and scores_given_text(task["protocol"])):
        return float(len(ablations))
    layers = model["num_layers"]
    shared = max(ablation.first_changed_layer(layers) for ablation in ablations)
    own = sum(layers - ablation.first_run_layer(layers) for ablation in ablations)
    return (shared + own) / layers


def job_tokens(
    model: dict,
    task: dict,
    ablations: tuple[Ablation, ...],
    cost: TaskCost,
    prefix_reuse: bool,
    backend: str,
) -> tuple[float, float]:
    """(prefill, decode) tokens of one job through the whole model."""
    # The sweep (ablate.sweep) runs every HF log-likelihood chunk; it shares each context among
    # its options where the attention kernel takes 4D masks (not flash attention).
    sweep = prefix_reuse and backend == "hf"
    kernel = model.get("attn_implementation") or "sdpa"
    shares = sweep and kernel in CONTEXT_SHARING_KERNELS
    passes = forward_passes(model, task, ablations, sweep)
    if scores_given_text(task["protocol"]):
        return passes * (cost.shared if shares else cost.sequences), 0.0
    prompt = cost.prompt - (cost.prompt_cached if backend == "vllm" else 0.0)
    return passes * prompt, len(ablations) * cost.generated


def chunk_seconds(
    model: dict,
    task: dict,
    ablations: tuple[Ablation, ...],
    rates: Rates,
    prefix_reuse: bool = True,
    backend: str = "hf",
    cost: TaskCost | None = None,
) -> float:
    """Wall seconds of one evaluation job: start-up, then its tokens at ``rates`` (``cost``:
    the task's tokens, by default the prior)."""
    device = device_kind(model)
    prefill, decode = job_tokens(model, task, ablations, cost or TaskCost.of(task, None),
                                 prefix_reuse, backend)  # fmt: skip
    work = prefill * rates[(device, backend, "prefill")]
    if decode:  # a log-likelihood-only backend has no decode rate
        work += decode * rates[(device, backend, "decode")]
    return BACKENDS[backend].job_overhead_s[device] + work * model["params_b"]


def calibrated_rates(
    config: dict[str, Any],
    workdir: Path,
    task_cost: Callable[[Chunk], TaskCost] | None = None,
) -> Rates:
    """Seconds per (token x B) fitted to finished jobs' benchmark TSVs (those of the config's
    current chunks), total time over total tokens: prefill from log-likelihood jobs, then decode
    from generation jobs net of their prefill at their backend's prefill rate (calibrated, else
    its prior). ``task_cost(chunk)``: the tokens of the chunk's task as it ran (counted, its
    measured generations), by default the prior."""
    reuse = config["evaluation"]["prefix_reuse"]
    rates = prior_rates()
    fitted: Rates = {}
    for phase in ("prefill", "decode"):
        seconds: dict[tuple[str, str, str], float] = defaultdict(float)
        tokens: dict[tuple[str, str, str], float] = defaultdict(float)
        for chunk in evaluation_chunks(config):
            model, task = config["models"][chunk.model], config["tasks"][chunk.task]
            tsv = Path(workdir) / BENCHMARK.format(model=chunk.model, task=chunk.task,
                                                   label=chunk.label)  # fmt: skip
            if not tsv.exists() or scores_given_text(task["protocol"]) != (phase == "prefill"):
                continue
            device = device_kind(model)
            wall = float(tsv.read_text().splitlines()[1].split("\t")[0])
            cost = task_cost(chunk) if task_cost else TaskCost.of(task, None)
            prefill, decode = job_tokens(model, task, chunk.ablations, cost, reuse, chunk.backend)
            net = (wall - BACKENDS[chunk.backend].job_overhead_s[device]) / model["params_b"]
            key = (device, chunk.backend, phase)
            if phase == "prefill":
                seconds[key] += net
                tokens[key] += prefill
            else:
                seconds[key] += net - prefill * rates[(device, chunk.backend, "prefill")]
                tokens[key] += decode
        for key in seconds:
            if tokens[key]:
                fitted[key] = rates[key] = max(seconds[key] / tokens[key], 0.0)
    return fitted
