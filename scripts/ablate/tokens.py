"""Token counts of a task's real requests, with the model's tokenizer: what the cost model
(ablate.cost) charges a job instead of a flat guess per document.

lm-eval itself builds the requests (few-shot examples, chat template, thinking switch, every
option) for a model (:func:`request_counter`) that answers nothing and keeps what it was asked,
tokenized by lm-eval's own ``TemplateLM`` encoding. Log-likelihood requests are then batched as
the shared-prefix sweep batches them (ablate.sweep), padding included, with and without running
each context once for its options.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablate.ablations import Ablation
from ablate.job import Job

TOKEN_COUNTS = "resources/tokens/{model}/{task}.json"  # the planner's counts, per (model, task)


@dataclass(frozen=True)
class TaskTokens:
    """What one unit of the task computes, in tokens (settings: the task config they count)."""

    documents: int
    shared: int  # log-likelihood: each context once for its options, padded as the sweep pads
    sequences: int  # log-likelihood: every option with its own context (lm-eval's way)
    prompt: int  # generate-until: prompt tokens
    budget: int  # generate-until: max_gen_toks per document, summed
    settings: dict[str, Any]


def request_counter(tokenizer, task: dict[str, Any]):
    """An lm-eval model that records the token ids of the requests it gets and answers dummies;
    lm-eval's own ``TemplateLM`` encodes them (as ``HFLM`` does). Imported here: the workflow
    reads token counts at parse time without lm-eval."""
    from lm_eval.api.model import TemplateLM

    class RequestCounter(TemplateLM):
        def __init__(self, tokenizer, task: dict[str, Any]) -> None:
            super().__init__()
            self.tokenizer = tokenizer
            self.chat_template_args = (
                {"enable_thinking": task["enable_thinking"]} if "enable_thinking" in task else {}
            )
            self.scored: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
            self.prompts: list[tuple[int, int]] = []  # (prompt tokens, max_gen_toks)

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def tokenizer_name(self) -> str:
            return self.tokenizer.name_or_path.replace("/", "__")

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return self.tokenizer.chat_template if chat_template else None

        def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
            return self.tokenizer.apply_chat_template(
                chat_history,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
                **self.chat_template_args,
            )

        def tok_encode(
            self, string: str, add_special_tokens: bool | None = None, **kwargs
        ) -> list[int]:
            return self.tokenizer(string, add_special_tokens=bool(add_special_tokens)).input_ids

        def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
            self.scored.extend((tuple(context), tuple(cont)) for _, context, cont in requests)
            return [(0.0, False)] * len(requests)

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            for request in requests:
                context, settings = request.args
                self.prompts.append(
                    (len(self.tok_encode(context)), settings.get("max_gen_toks", 256))
                )
            return [""] * len(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            raise NotImplementedError("no figure scores rolling log-likelihoods")

    return RequestCounter(tokenizer, task)


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


def count_task_tokens(model_dir: Path, task: dict[str, Any], data_dir: str) -> TaskTokens:
    """Build the task's requests with lm-eval and count them with the model's tokenizer."""
    from lm_eval.models.utils import resolve_max_length
    from transformers import AutoConfig, AutoTokenizer

    from ablate.lm_eval_tasks import load_task, run_lm_eval, task_manager

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    counter = request_counter(tokenizer, task)
    manager = task_manager(task, data_dir)
    job = Job(model_dir=model_dir, model={}, task=task, data_dir=data_dir)
    output = run_lm_eval(counter, job, manager, load_task(manager, task["lm_eval_task"]),
                         Ablation.parse("base"))  # fmt: skip
    # A sample per document and filter (GSM8K's strict and flexible extraction): count documents.
    documents = len({(name, sample["doc_id"]) for name, samples in output["samples"].items()
                     for sample in samples})  # fmt: skip
    # The evaluation's context cap, as HFLM sets it where the task has none: the model's.
    max_length = task.get("max_length") or resolve_max_length(
        AutoConfig.from_pretrained(model_dir), tokenizer
    )
    batch_size = task.get("batch_size", 16)
    return TaskTokens(
        documents=documents,
        shared=padded_tokens(counter.scored, batch_size, max_length, True),
        sequences=padded_tokens(counter.scored, batch_size, max_length, False),
        prompt=sum(prompt for prompt, _ in counter.prompts),
        budget=sum(budget for _, budget in counter.prompts),
        settings=task,
    )


def read_task_tokens(path: Path, task: dict[str, Any]) -> TaskTokens | None:
    """The counts at ``path`` if they were counted for these task settings."""
    if not path.exists():
        return None
    counts = TaskTokens(**json.loads(path.read_text()))
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
