"""Dataset loaders and prompt helpers for the offline task YAMLs in this folder.

Loaders are lm-eval ``custom_dataset`` callables: they receive the task's ``dataset_kwargs`` plus the
run ``metadata`` (which carries ``data_dir``, the folder holding the offline JSON Lines files).
"""

from __future__ import annotations

import functools
import random
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import datasets
import yaml
from lm_eval.tasks.hellaswag.utils import process_docs as lm_eval_hellaswag_process_docs
from lm_eval.tasks.mathqa.utils import doc_to_choice as mathqa_doc_to_choice  # noqa: F401

Processing = Callable[[datasets.Dataset], datasets.Dataset]


def processed_once(process: Processing) -> Processing:
    """``process`` run once per dataset: lm-eval processes a task's documents again several times
    per evaluation (~0.7 s each for HellaSwag's 10k documents, ~3 s a unit), and a job evaluates
    the same task for many units."""
    processed: dict[str, datasets.Dataset] = {}

    @functools.wraps(process)
    def once(dataset: datasets.Dataset) -> datasets.Dataset:
        if dataset._fingerprint not in processed:
            processed[dataset._fingerprint] = process(dataset)
        return processed[dataset._fingerprint]

    return once


# lm-eval's own document processing, reused as is.
hellaswag_process_docs = processed_once(lm_eval_hellaswag_process_docs)


def local_jsonl(data_dir: str, files: dict[str, str], **_) -> datasets.DatasetDict:
    """Load ``{split: relative path}`` JSON Lines files under ``data_dir``."""
    root = Path(data_dir)
    missing = [str(root / f) for f in files.values() if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"data_dir={data_dir}: missing {', '.join(missing)}")
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_json(str(root / path), keep_in_memory=True)
            for split, path in files.items()
        }
    )


@processed_once
def interleave_subjects(dataset: datasets.Dataset) -> datasets.Dataset:
    """Round-robin over MMLU subjects so that a small ``limit`` still spans every subject."""
    rank: dict[str, int] = {}
    order = []
    # Read the column through Arrow: lm-eval re-processes the docs on every evaluation.
    for index, subject in enumerate(dataset.data.column("subject").to_pylist()):
        order.append((rank.get(subject, 0), subject, index))
        rank[subject] = rank.get(subject, 0) + 1
    return dataset.select([index for _, _, index in sorted(order)])


# --- GSM8K chain-of-thought -------------------------------------------------------------------


def gsm8k_cot_exemplars() -> list[dict]:
    """The 8 chain-of-thought exemplars of Wei et al. (2022), read from lm-eval's own gsm8k_cot."""
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k-cot.yaml"
    with path.open() as handle:
        return yaml.safe_load(handle)["fewshot_config"]["samples"]


# --- OpenBookQA open-book -------------------------------------------------------------------


def gsm8k_text(doc: dict) -> str:
    """A GSM8K problem and its worked solution as plain text: the calculator annotations
    (``<<48/2=24>>``) removed, the final ``#### answer`` line kept."""
    return f"{doc['question']}\n{re.sub(r'<<[^>]*>>', '', doc['answer'])}"


def oracle_fact(doc: dict) -> str:
    """Stand-in for OpenBookQA's gold science fact: the gold answer restated as a sentence.

    The real ``fact1`` (hub config ``additional``) is a general science fact; this oracle leaks the
    answer outright, so it is an upper bound on what a supporting fact can give, not the same input.
    """
    gold = doc["choices"]["text"][doc["choices"]["label"].index(doc["answerKey"].strip())]
    return f"Fact: {doc['question_stem'].rstrip(' ?:.')} - {gold}."


@processed_once
def add_oracle_fact(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset.map(lambda doc: {"fact1": oracle_fact(doc)})


def open_book_text(doc: dict) -> str:
    """Open-book prompt: the supporting fact, then the question, as closed-book would ask it."""
    return f"{doc['fact1'].strip()}\n{doc['question_stem']}"


# --- Key-value retrieval (Liu et al. 2023, "Lost in the Middle"; Bick et al. 2025) ----------


def kv_records(num_pairs: int, gold_position: int | None, num_docs: int, seed: int) -> list[dict]:
    """Documents in the format of lost-in-the-middle's ``kv-retrieval-*_keys.jsonl`` files.

    Keys and values are UUID4 strings drawn from a seeded generator; ``gold_position`` is the index
    of the queried pair (None: uniform at random per document).
    """
    rng = random.Random(seed)

    def new_uuid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    docs = []
    for _ in range(num_docs):
        pairs = [[new_uuid(), new_uuid()] for _ in range(num_pairs)]
        gold = rng.randrange(num_pairs) if gold_position is None else gold_position
        key, value = pairs[gold]
        docs.append({"ordered_kv_records": pairs, "key": key, "value": value})
    return docs


def kv_retrieval(
    num_pairs: int = 10,
    gold_position: int | None = None,
    num_docs: int = 500,
    seed: int = 1234,
    **_,
) -> datasets.DatasetDict:
    if gold_position is not None and not 0 <= gold_position < num_pairs:
        raise ValueError(f"kv_retrieval: gold_position {gold_position} not in 0..{num_pairs - 1}")
    docs = kv_records(num_pairs, gold_position, num_docs, seed)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def kv_text(doc: dict) -> str:
    body = ",\n ".join(f'"{key}": "{value}"' for key, value in doc["ordered_kv_records"])
    return (
        "Extract the value corresponding to the specified key in the JSON object below.\n\n"
        f"JSON data:\n{{{body}}}\n\n"
        f'Key: "{doc["key"]}"\nCorresponding value:'
    )


def kv_choices(doc: dict) -> list[str]:
    """Every value of the context is an option; the queried key's value is the gold one."""
    return [f'"{value}"' for _, value in doc["ordered_kv_records"]]


def kv_target(doc: dict) -> int:
    return [value for _, value in doc["ordered_kv_records"]].index(doc["value"])
