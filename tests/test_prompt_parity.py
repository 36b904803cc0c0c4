"""Every offline stand-in task builds exactly the requests of the lm-eval task it stands in for.

lm-eval's own registered YAML is loaded (includes and ``!function`` helpers resolved) with only its
dataset replaced by the same local JSON Lines; both tasks then build their requests on the same
documents, and contexts (few-shot examples included), continuations, generation arguments and
gold targets must be identical.
"""

from __future__ import annotations

import functools
import sys

import pytest

from ablate.lm_eval_tasks import TASKS_DIR, task_manager
from conftest import DATA_DIR

sys.path.insert(0, str(TASKS_DIR))
import utils as task_utils

SEED = 1234  # the run's fewshot_random_seed
DOCS = 3
SUBJECT = "high_school_physics"  # MMLU: one subject's registered task


@functools.cache
def registered_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(metadata={"data_dir": str(DATA_DIR)})


def mmlu_subject(data_dir: str, files: dict[str, str], **_):
    """The local MMLU files restricted to one subject: the dataset of ``mmlu_<subject>``."""
    dataset = task_utils.local_jsonl(data_dir, files)
    return dataset.filter(lambda doc: doc["subject"] == SUBJECT)


def registered_on_local_data(name: str, files: dict[str, str], loader=task_utils.local_jsonl):
    """lm-eval's registered task ``name`` with only its dataset replaced."""
    from lm_eval.tasks._yaml_loader import load_yaml

    manager = registered_manager()
    config = load_yaml(manager.task_index[name].yaml_path, resolve_func=True)
    for key in ("dataset_path", "dataset_name", "tag"):
        config.pop(key, None)
    config.update(custom_dataset=loader, dataset_kwargs={"files": files})
    for key in ("training_split", "validation_split", "test_split"):  # splits without a copy
        if config.get(key) not in files:
            config[key] = None
    (task,) = manager.load([config])["tasks"].values()
    return task


def requests_by_document(task, num_fewshot: int | None, docs: int) -> dict[str, dict]:
    """Per document (keyed by its own fields): its gold target and every request's arguments,
    i.e. (context, continuation) or (context, generation kwargs), as lm-eval builds them."""
    if num_fewshot is not None:
        task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=SEED)
    task.build_all_requests(limit=docs, rank=0, world_size=1)
    built: dict[str, dict] = {}
    for instance in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        doc = instance.doc
        entry = built.setdefault(repr(doc), {"target": task.doc_to_target(doc), "requests": []})
        entry["requests"].append(instance.arguments)
    return built


GSM8K = {"test": "gsm8k/test.jsonl", "train": "gsm8k/train.jsonl"}
MMLU = {"test": "mmlu/test.jsonl", "dev": "mmlu/dev.jsonl"}
# local task, registered task, local files the registered one reads, few-shot settings
CASES = [
    ("hellaswag_local", "hellaswag", {"validation": "hellaswag/validation.jsonl"}, [None]),
    ("mathqa_local", "mathqa", {"test": "mathqa/test.jsonl"}, [None]),
    ("openbookqa_local", "openbookqa", {"test": "openbookqa/test.jsonl"}, [None]),
    ("gsm8k_local", "gsm8k", GSM8K, [None, 1, 4, 8]),
    ("gsm8k_cot_local", "gsm8k_cot", GSM8K, [None]),
    ("mmlu_local", f"mmlu_{SUBJECT}", MMLU, [None]),
    ("mmlu_continuation_local", f"mmlu_{SUBJECT}_continuation", MMLU, [None]),
    ("mmlu_generative_local", f"mmlu_{SUBJECT}_generative", MMLU, [None]),
]


def local_requests(name: str, num_fewshot: int | None) -> dict[str, list]:
    (task,) = task_manager({"local": True}, str(DATA_DIR)).load([name])["tasks"].values()
    # MMLU interleaves its 57 subjects: enough documents to hold DOCS of the chosen subject.
    docs = DOCS * 57 if name.startswith("mmlu") else DOCS
    built = requests_by_document(task, num_fewshot, docs)
    if name.startswith("mmlu"):
        built = {doc: value for doc, value in built.items() if f"'{SUBJECT}'" in doc}
    return built


@pytest.mark.parametrize(
    ("local", "registered", "files", "shots"), CASES, ids=[c[0] for c in CASES]
)
def test_local_task_builds_the_registered_task_requests(local, registered, files, shots):
    loader = mmlu_subject if local.startswith("mmlu") else task_utils.local_jsonl
    for num_fewshot in shots:
        expected = requests_by_document(
            registered_on_local_data(registered, files, loader), num_fewshot, DOCS
        )
        actual = local_requests(local, num_fewshot)
        assert len(expected) == DOCS
        assert actual == expected, f"{local} vs {registered}, num_fewshot={num_fewshot}"


def test_gsm8k_shots_are_drawn_per_document_as_lm_eval_draws_them():
    """lm-eval's gsm8k samples each document's shots with its seeded generator (not the first n
    training rows); gsm8k_cot prepends Wei et al.'s 8 exemplars by default."""
    one_shot = [entry["requests"][0][0] for entry in local_requests("gsm8k_local", 1).values()]
    first_train = next(iter(task_utils.local_jsonl(str(DATA_DIR), GSM8K)["train"]))["question"]
    assert not any(context.startswith(f"Question: {first_train}") for context in one_shot)
    assert len({context.split("\n\n")[0] for context in one_shot}) == DOCS
    (cot, *_) = [
        entry["requests"][0][0] for entry in local_requests("gsm8k_cot_local", None).values()
    ]
    assert cot.startswith("Q: There are 15 trees") and cot.count("Q: ") == 8 + 1


def test_a_one_word_difference_is_caught():
    """The old mmlu_continuation_local description ("multiple choice questions") fails."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(TASKS_DIR / "mmlu_continuation_local.yaml", resolve_func=True)
    config["description"] = config["description"].replace("questions", "multiple choice questions")
    manager = task_manager({"local": True}, str(DATA_DIR))
    (task,) = manager.load([config])["tasks"].values()
    changed = {
        doc: entry
        for doc, entry in requests_by_document(task, None, DOCS * 57).items()
        if f"'{SUBJECT}'" in doc
    }
    expected = requests_by_document(
        registered_on_local_data(f"mmlu_{SUBJECT}_continuation", MMLU, mmlu_subject), None, DOCS
    )
    assert changed.keys() == expected.keys() and changed != expected


def test_mmlu_stand_ins_refuse_few_shot(tmp_path):
    """Their few-shot pool would span every subject, unlike lm-eval's mmlu: refused up front."""
    from ablate.download import prefetch_task

    task = {"lm_eval_task": "mmlu_local", "local": True, "num_fewshot": 5}
    with pytest.raises(ValueError, match=r"num_fewshot: 5 for mmlu_local, which allows at most 0"):
        prefetch_task(task, str(DATA_DIR), tmp_path / "task.json")
