"""The offline dataset cache: lm-eval's registered tasks, unchanged, load the shared files from it.

The cache is built into a temporary folder (two MMLU subjects); lm-eval then runs in a subprocess
with HF_HUB_OFFLINE=1, a fresh HOME and HF_HOME, and only HF_DATASETS_CACHE pointing at the cache.
The same load with nothing cached must fail, so it is the cache that provides the documents.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ablate.offline_datasets import MANIFEST, MISSING, build
from conftest import DATA_DIR

SUBJECTS = ["anatomy", "high_school_physics"]
TASKS = ["hellaswag", "mathqa", "openbookqa", "gsm8k", "gsm8k_cot"] + [
    f"mmlu_{subject}{protocol}"
    for subject in SUBJECTS
    for protocol in ("", "_continuation", "_generative")
]

# Runs offline: per task, what lm-eval built from the cache (or the error it raised).
PROBE = """
import json, sys
from lm_eval.tasks import TaskManager

manager, report = TaskManager(), {}
for name in json.loads(sys.argv[1]):
    try:
        task = manager.load([name])["tasks"][name]
    except Exception as error:
        report[name] = {"error": f"{type(error).__name__}: {error}"}
        continue
    docs = task.eval_docs
    first = docs[0]
    shots = {}
    for n in (0, 1, 5):
        try:
            task.fewshot_context(first, n)
            shots[n] = "ok"
        except Exception as error:
            shots[n] = f"{type(error).__name__}: {error}"
    report[name] = {
        "splits": {split: len(rows) for split, rows in task.dataset.items()},
        "features": task.dataset[next(iter(task.dataset))].features.to_dict(),
        "docs": len(docs),
        "first": first,
        "last": docs[len(docs) - 1],
        "text": task.doc_to_text(first),
        "target": task.doc_to_target(first),
        "shots": shots,
    }
print(json.dumps(report, default=str))
"""


def rows(path: str) -> list[dict[str, Any]]:
    with (DATA_DIR / path).open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


# Runs offline: prefetch of registered tasks, and the registry folders each record names.
PREFETCH = """
import json, sys
from pathlib import Path
from ablate.download import prefetch_task

folders = {}
for name, protocol in json.loads(sys.argv[1]):
    record = Path(sys.argv[2]) / f"{name}.json"
    prefetch_task({"lm_eval_task": name, "local": False, "protocol": protocol}, sys.argv[3], record)
    folders[name] = json.loads(record.read_text())["registry_folders"]
print(json.dumps(folders))
"""


def offline_probe(
    tmp_path: Path, cache: Path | None, script: str = PROBE, *args: str
) -> dict[str, Any]:
    home = tmp_path / "home"  # nothing from ~/.cache/huggingface
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "HF_HOME": str(home / "hf")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    if cache is not None:
        env["HF_DATASETS_CACHE"] = str(cache)
    done = subprocess.run(
        [sys.executable, "-c", script, *(args or [json.dumps(TASKS)])],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf")
    build(DATA_DIR, out, SUBJECTS)
    return out


@pytest.fixture(scope="module")
def loaded(cache, tmp_path_factory) -> dict[str, Any]:
    return offline_probe(tmp_path_factory.mktemp("online"), cache / "datasets")


def expected(name: str) -> tuple[list[dict[str, Any]], dict[str, int], str, Any]:
    """The shared rows the task evaluates, the split sizes, and the first row's text and target."""
    if name.startswith("mmlu_"):
        subject = (
            name.removeprefix("mmlu_").removesuffix("_continuation").removesuffix("_generative")
        )
        split_rows = {
            split: [row for row in rows(f"mmlu/{split}.jsonl") if row["subject"] == subject]
            for split in ("test", "dev", "validation")
        }
        docs, row = split_rows["test"], split_rows["test"][0]
        options = "".join(
            f"\n{letter}. {c}" for letter, c in zip("ABCD", row["choices"], strict=True)
        )
        question = row["question"].strip()
        text, target = f"{question}{options}\nAnswer:", row["answer"]
        if name.endswith("_continuation"):
            text = f"Question: {question}\nAnswer:"
        if name.endswith("_generative"):
            target = "ABCD"[row["answer"]]
        return docs, {split: len(r) for split, r in split_rows.items()}, text, target
    if name == "hellaswag":
        docs, row = rows("hellaswag/validation.jsonl"), rows("hellaswag/validation.jsonl")[0]
        text = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
        return docs, {"train": 1, "validation": len(docs)}, text, int(row["label"])
    if name == "mathqa":
        docs = rows("mathqa/test.jsonl")
        row = docs[0]
        target = "abcde".index(row["correct"])
        return docs, {"train": 1, "test": len(docs)}, f"Question: {row['Problem']}\nAnswer:", target
    if name == "openbookqa":
        docs, validation = rows("openbookqa/test.jsonl"), rows("openbookqa/validation.jsonl")
        row = docs[0]
        target = row["choices"]["label"].index(row["answerKey"])
        sizes = {"train": 1, "test": len(docs), "validation": len(validation)}
        return docs, sizes, row["question_stem"], target
    docs, train = rows("gsm8k/test.jsonl"), rows("gsm8k/train.jsonl")
    row = docs[0]
    if name == "gsm8k":
        text, target = f"Question: {row['question']}\nAnswer:", row["answer"]
    else:  # gsm8k_cot
        text, target = f"Q: {row['question']}\nA:", row["answer"].split("####")[-1].strip()
    return docs, {"train": len(train), "test": len(docs)}, text, target


@pytest.mark.parametrize("name", TASKS)
def test_registered_task_reads_the_shared_rows(loaded, name):
    task = loaded[name]
    assert "error" not in task, task.get("error")
    docs, sizes, text, target = expected(name)
    assert task["splits"] == sizes
    assert task["docs"] == len(docs)
    # process_docs (hellaswag) adds fields; every shared field is there, unchanged.
    assert {key: task["first"][key] for key in docs[0]} == docs[0]
    assert {key: task["last"][key] for key in docs[-1]} == docs[-1]
    assert task["text"] == text
    assert task["target"] == target


def test_real_numbers_and_hub_types(loaded):
    assert loaded["hellaswag"]["docs"] == 10042
    assert loaded["gsm8k"]["docs"] == 1319
    assert loaded["mathqa"]["docs"] == 2985
    assert loaded["openbookqa"]["docs"] == 500
    hellaswag = loaded["hellaswag"]["features"]
    assert hellaswag["label"] == {"dtype": "string", "_type": "Value"}
    assert hellaswag["endings"]["_type"] == "List"
    answer = loaded["mmlu_anatomy"]["features"]["answer"]
    assert answer == {"names": ["A", "B", "C", "D"], "_type": "ClassLabel"}


def test_few_shot_only_where_the_shared_data_have_a_pool(loaded):
    assert loaded["gsm8k"]["shots"] == {"0": "ok", "1": "ok", "5": "ok"}  # from train
    assert loaded["mmlu_anatomy"]["shots"] == {"0": "ok", "1": "ok", "5": "ok"}  # from dev
    for name in ("hellaswag", "mathqa", "openbookqa"):  # the placeholder train split
        shots = loaded[name]["shots"]
        assert shots["0"] == "ok"
        assert shots["1"].startswith("ValueError") and shots["5"].startswith("ValueError")
    assert MISSING in loaded["openbookqa"]["shots"]["1"]


def test_prefetch_records_the_registry_folders_its_evaluations_index(cache, tmp_path):
    """A registered task's jobs index only the registry folders that define it (lm-eval's whole
    registry costs ~10 s per job): prefetch records them once a build from them alone gives the
    task's configs unchanged."""
    tasks = [("hellaswag", "loglikelihood"), ("gsm8k_cot", "generate_until"),
             ("mmlu_anatomy_continuation", "loglikelihood")]  # fmt: skip
    folders = offline_probe(
        tmp_path, cache / "datasets", PREFETCH, json.dumps(tasks), str(tmp_path), str(DATA_DIR)
    )
    assert folders == {
        "hellaswag": ["hellaswag"],
        "gsm8k_cot": ["gsm8k"],
        "mmlu_anatomy_continuation": ["mmlu/continuation"],
    }


def test_without_the_cache_the_same_load_fails(tmp_path):
    report = offline_probe(tmp_path, cache=None)
    assert all("Couldn't reach" in report[name].get("error", "") for name in TASKS), report


def test_manifest_lists_every_split_and_its_source(cache):
    manifest = json.loads((cache / MANIFEST).read_text())["datasets"]
    assert sorted(manifest) == [
        "Rowan/hellaswag",
        "allenai/openbookqa",
        "cais/mmlu",
        "openai/gsm8k",
        "regisss/math_qa",
    ]
    assert sorted(manifest["cais/mmlu"]) == ["all", *SUBJECTS]
    assert manifest["cais/mmlu"]["all"]["test"] == {"rows": 14042, "source": "mmlu/test.jsonl"}
    assert manifest["Rowan/hellaswag"]["default"]["train"] == {"rows": 1, "source": "placeholder"}


def test_rebuild_reuses_the_cache(cache):
    folders = sorted(p for p in (cache / "datasets").glob("*/*/*/*") if p.is_dir())
    before = {p: p.stat().st_mtime_ns for p in folders}
    build(DATA_DIR, cache, SUBJECTS)
    assert {p: p.stat().st_mtime_ns for p in folders} == before
    assert sorted(p for p in (cache / "datasets").glob("*/*/*/*") if p.is_dir()) == folders
