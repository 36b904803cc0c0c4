"""The offline task YAMLs: prompts, gold options and answer extraction, on real documents."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from ablate.backends.hf import budget_flags
from ablate.lm_eval_tasks import TASKS_DIR, task_manager
from ablate.metrics import acc_ce, mean_and_stderr
from conftest import DATA_DIR

sys.path.insert(0, str(TASKS_DIR))
import utils as task_utils

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def load_task(name: str):
    manager = task_manager({"local": True}, str(DATA_DIR))
    (task,) = manager.load([name])["tasks"].values()
    return task


def first_doc(task):
    return next(iter(task.test_docs() if task.has_test_docs() else task.validation_docs()))


# --- key-value retrieval ------------------------------------------------------------------


def reference_kv_doc() -> dict:
    """The first document of lost-in-the-middle's 75-key file."""
    with (DATA_DIR / "kv_retrieval/kv-retrieval-75_keys.jsonl").open() as handle:
        return json.loads(handle.readline())


def test_kv_generator_matches_the_reference_format():
    reference = reference_kv_doc()
    (generated,) = task_utils.kv_records(num_pairs=75, gold_position=None, num_docs=1, seed=7)
    assert set(generated) == set(reference)
    assert len(generated["ordered_kv_records"]) == len(reference["ordered_kv_records"]) == 75
    for key, value in generated["ordered_kv_records"] + reference["ordered_kv_records"][:3]:
        assert UUID4.match(key) and UUID4.match(value)
    assert [generated["key"], generated["value"]] in generated["ordered_kv_records"]


def test_kv_generator_is_deterministic_and_places_the_gold_pair():
    docs = task_utils.kv_records(num_pairs=5, gold_position=3, num_docs=4, seed=11)
    assert docs == task_utils.kv_records(num_pairs=5, gold_position=3, num_docs=4, seed=11)
    assert docs != task_utils.kv_records(num_pairs=5, gold_position=3, num_docs=4, seed=12)
    assert all(doc["ordered_kv_records"][3] == [doc["key"], doc["value"]] for doc in docs)
    with pytest.raises(ValueError, match=r"gold_position 5 not in 0\.\.4"):
        task_utils.kv_retrieval(num_pairs=5, gold_position=5)


def test_kv_correct_option_is_the_queried_value():
    reference = reference_kv_doc()
    choices = task_utils.kv_choices(reference)
    assert len(choices) == 75
    assert choices[task_utils.kv_target(reference)] == f'"{reference["value"]}"'
    prompt = task_utils.kv_text(reference)
    assert prompt.endswith(f'Key: "{reference["key"]}"\nCorresponding value:')
    assert prompt.count(reference["value"]) == 1


def test_kv_task_builds_through_lm_eval():
    task = load_task("kv_retrieval_short")
    doc = first_doc(task)
    assert len(task.doc_to_choice(doc)) == 3
    assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == f'"{doc["value"]}"'


# --- OpenBookQA open-book -----------------------------------------------------------------

FIXTURE = {
    "id": "t-1",
    "question_stem": "Which of these would let the most heat travel through?",
    "choices": {"text": ["a wooden spoon", "a steel spoon", "a plastic cup", "a wool sock"],
                "label": ["A", "B", "C", "D"]},
    "answerKey": "B",
    "fact1": "metal is a thermal conductor",
}  # fmt: skip


def test_open_book_prompt_puts_the_fact_before_the_question():
    assert task_utils.open_book_text(FIXTURE) == (
        "metal is a thermal conductor\nWhich of these would let the most heat travel through?"
    )


def test_oracle_stand_in_restates_the_gold_answer():
    doc = {k: v for k, v in FIXTURE.items() if k != "fact1"}
    fact = task_utils.oracle_fact(doc)
    assert fact == "Fact: Which of these would let the most heat travel through - a steel spoon."
    assert task_utils.open_book_text({**doc, "fact1": fact}).endswith(doc["question_stem"])


def test_closed_and_open_book_tasks_share_questions_and_gold():
    closed, open_book = load_task("openbookqa_local"), load_task("openbookqa_open_oracle_local")
    closed_doc, open_doc = first_doc(closed), first_doc(open_book)
    assert closed.doc_to_text(closed_doc) == closed_doc["question_stem"]
    assert open_book.doc_to_text(open_doc).endswith("\n" + closed_doc["question_stem"])
    assert closed.doc_to_target(closed_doc) == open_book.doc_to_target(open_doc)


# --- GSM8K --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task_name", "generation", "correct"),
    [
        ("gsm8k_local", "<think>5 + 13 = 17? no, 18</think> 5 + 13 = 18\n#### 18", True),
        ("gsm8k_local", "<think>the answer is 18</think> so #### 17", False),
        ("gsm8k_cot_local", "<think>Let me think. 3 + 15 = 18.</think> The answer is 18.", True),
    ],
)
def test_answer_after_the_reasoning_trace_is_scored(task_name, generation, correct):
    from lm_eval.api.instance import Instance
    from lm_eval.models.utils import postprocess_generated_text

    task = load_task(task_name)
    doc = {"question": "q", "answer": "5 + 13 = <<5+13=18>>18\n#### 18"}
    # What HFLM does with think_end_token, then the task's own filters and metric.
    response = postprocess_generated_text(generation, ["Question:", "Q:"], "</think>")
    instance = Instance("generate_until", doc, ("", {}), idx=0)
    instance.resps = [response]
    for filter_set in task._filters:
        filter_set.apply([instance])
    filtered = instance.filtered_resps["flexible-extract"]
    assert task.process_results(doc, [filtered])["exact_match"] == float(correct)


def test_cot_exemplars_come_from_lm_eval():
    shots = task_utils.gsm8k_cot_exemplars()
    assert len(shots) == 8
    assert shots[0]["target"].endswith("The answer is 6.")


def test_budget_flags_mark_unfinished_generations():
    eos = 2

    def decode(ids):
        return " ".join(str(i) for i in ids)

    generated = torch.tensor([[5, 6, eos, eos], [5, 6, 7, 8], [9, 9, 9, 9]])
    assert budget_flags(generated, eos, decode, stop=["9 9"]) == [False, True, False]


# --- MMLU, HellaSwag, MathQA ---------------------------------------------------------------


def test_mmlu_interleaves_subjects_for_small_limits():
    task = load_task("mmlu_local")
    docs = list(task.test_docs())
    subjects = sorted({doc["subject"] for doc in docs})
    # Round-robin: each block of 57 documents holds every subject once, in alphabetical order.
    assert len(subjects) == 57
    assert [doc["subject"] for doc in docs[:57]] == subjects
    assert [doc["subject"] for doc in docs[57:114]] == subjects
    # The prompt lm-eval builds for a document names that document's subject.
    for doc in (docs[0], docs[30], docs[113]):
        about = doc["subject"].replace("_", " ")
        assert task.fewshot_context(doc, 0) == (
            f"The following are multiple choice questions (with answers) about {about}.\n\n"
            + task.doc_to_text(doc)
        )
        assert task.doc_to_text(doc).endswith("\nAnswer:")


@pytest.mark.parametrize(
    ("task_name", "choices"),
    [("hellaswag_local", 4), ("mathqa_local", 5), ("mmlu_continuation_local", 4)],
)
def test_multiple_choice_tasks_build(task_name, choices):
    task = load_task(task_name)
    doc = first_doc(task)
    assert len(task.doc_to_choice(doc)) == choices
    assert 0 <= task.doc_to_target(doc) < choices


# --- metrics ------------------------------------------------------------------------------


def test_acc_ce_divides_by_tokens_not_bytes():
    # Option 1 has the higher total log-likelihood but the worse per-token mean.
    assert acc_ce([-6.0, -4.0], [3, 1], gold=0) == 1.0
    assert acc_ce([-6.0, -4.0], [3, 1], gold=1) == 0.0


def test_mean_and_stderr_by_hand():
    mean, stderr = mean_and_stderr([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75
    assert stderr == pytest.approx((0.25 / 4) ** 0.5)
