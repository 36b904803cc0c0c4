"""The paper config, every figure, through lm-eval's registered tasks, on the embedded model.

``config.yaml`` is read with the workflow's own loader and shrunk by code (:func:`derive`): every
model becomes the embedded SmolLM2-135M (an o_proj source: SmolLM2 with seeded o_proj noise, as
in the demo), every task keeps its lm-eval task, protocol, few-shot count, chat template and the
figures' metrics and filters, and only limits, layer/head lists, batch sizes and generation
budgets shrink. Settings SmolLM2 cannot honour are replaced and listed in :data:`REPLACED`.
``snakemake all`` then runs offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, an empty HF_HOME) on
the `datasets` cache that :mod:`ablate.offline_datasets` builds from ../shared/data, plus
labelled fixtures for the hub configs that have no offline copy (OpenBookQA's facts,
WikiText-2).

Its timing: docs/cluster.md, "Air-gapped clusters".
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from typing import Any

import datasets
import pandas as pd
import pytest
import yaml
from datasets import Features, Value

from ablate.ablations import SOURCE_KINDS
from ablate.config import load_config_file, panel_series
from ablate.offline_datasets import REPOS, STRING, Repo, build, write_config
from conftest import DATA_DIR, REPO, SMOLLM2, snakemake

PAPER: dict[str, Any] = load_config_file(REPO / "config.yaml")
# Shrunk: documents per task (per subtask of the MMLU groups: 57), batch, generation budget, and
# the units of a sweep over every layer (the last layer) or every head (head 4, of KV group 1).
LIMIT = 1
BATCH_SIZE = 8
MAX_GEN_TOKS = 8
SWEEP = [SMOLLM2["num_layers"] - 1]
HEADS = [4]
REMOVED = [1, 2]  # layers removed at once by a layer_set sweep
# Every paper model becomes SmolLM2, and an o_proj source the demo's stand-in (SmolLM2 with seeded
# noise on every o_proj weight): paper models with equal test specs are one model, so figures
# that share a task share its jobs, as in the demo.
STAND_IN = "smollm2_noisy_oproj"
MODELS = {
    "smollm2": SMOLLM2 | {"label": "SmolLM2-135M"},
    STAND_IN: SMOLLM2 | {"label": "SmolLM2 noisy-o_proj stand-in", "o_proj_noise": 0.5},
}
MODEL_OF = {"llama31_8b": "smollm2", "qwen3_8b": "smollm2", "llama1_7b": "smollm2",
            "r1_distill_llama8b": STAND_IN}  # fmt: skip
THINKING = "SmolLM2's chat template has no enable_thinking switch (download_model refuses it)"
# Settings of config.yaml the embedded model cannot honour: replaced, and why. (So fig10's two
# Qwen3 series get one prompt; they still differ in think_end_token, as in the paper config.)
REPLACED = {
    "models.qwen3_8b.has_thinking": f"dropped: {THINKING}",
    "tasks.gsm8k_8shot_thinking.enable_thinking": f"true -> null: {THINKING}",
    "tasks.gsm8k_8shot_no_thinking.enable_thinking": f"false -> null: {THINKING}",
    "tasks.gsm8k_1shot_thinking.enable_thinking": f"true -> null: {THINKING}",
}
ON_HF = (
    "vllm -> hf: vLLM's CPU engine takes minutes to start in every job; tests/test_vllm.py checks "
    "that both backends give the same generations through the workflow"
)
# What derive() may change in a task; everything else must stay the paper's.
SHRUNK_TASK_KEYS = {"limit", "batch_size", "gen_kwargs", "enable_thinking", "backend"}

# FIXTURE, not data: allenai/openbookqa's "additional" config (the gold science fact `fact1` of
# each question, which openbookqa_open prepends) has no offline copy. These rows were written for
# this test in that config's schema, so the task loads them unchanged from the cache; their
# scores mean nothing.
(OPENBOOKQA,) = (repo for repo in REPOS if repo.repo_id == "allenai/openbookqa")
OPENBOOKQA_ADDITIONAL = Repo(
    OPENBOOKQA.repo_id,
    Features(
        {
            **OPENBOOKQA.features,
            "fact1": STRING,
            "humanScore": Value("float32"),
            "clarity": Value("float32"),
            "turkIdAnonymized": STRING,
        }
    ),
    configs={},
)
FACT_ROWS = [
    ("A magnet will stick to", ["a wooden door", "a steel fridge", "a glass pane", "a paper cup"],
     "B", "a magnet attracts iron and steel"),
    ("Plants make food using", ["sunlight", "sand", "darkness", "plastic"],
     "A", "plants use sunlight to make food by photosynthesis"),
    ("When water freezes it becomes", ["steam", "a gas", "ice", "a plasma"],
     "C", "freezing turns liquid water into solid ice"),
]  # fmt: skip


def fact_fixture() -> list[dict[str, Any]]:
    return [
        {"id": f"fixture-{number}", "question_stem": stem,
         "choices": {"text": texts, "label": ["A", "B", "C", "D"]}, "answerKey": answer,
         "fact1": fact, "humanScore": 1.0, "clarity": 2.0, "turkIdAnonymized": "fixture"}
        for number, (stem, texts, answer, fact) in enumerate(FACT_ROWS, 1)
    ]  # fmt: skip


# FIXTURE, not data: WikiText-2 (EleutherAI/wikitext_document_level, the perplexity figures'
# task) has no offline copy. These pages were written for this test in that dataset's schema;
# their perplexities mean nothing.
WIKITEXT = Repo("EleutherAI/wikitext_document_level", Features({"page": STRING}), configs={})
WIKITEXT_PAGES = [
    " = Fixture page = \n The river rises in the northern hills and flows south through three "
    "towns before it reaches the sea . \n",
    " = Another fixture = \n In 1901 the bridge was rebuilt in stone , and the old wooden one "
    "was moved to the museum . \n",
]


def smollm2_layer(layer: int, paper_layers: int) -> int:
    """A layer the paper names, on SmolLM2: the same index where it exists, else the same distance
    from the top (Qwen3's last layer 35 of 36 -> 29; R1-Distill's 30 of 32 -> 28), as the demo."""
    top = SMOLLM2["num_layers"]
    return layer if layer < top else top - (paper_layers - layer)


def picks_its_layers(ablation: dict[str, Any]) -> bool:
    return ablation["kind"] == "layer_set" and ablation.get("order") != "explicit"


def shrink_ablation(ablation: dict[str, Any], paper_layers: set[int]) -> dict[str, Any]:
    out = dict(ablation)
    named = ablation.get("layers", "all")
    if picks_its_layers(ablation):
        pass  # a proxy or random removal order picks from every layer (only explicit takes any)
    elif named == "all":
        out["layers"] = SWEEP
    else:
        (layers,) = paper_layers  # the models of a spec that names layers have one depth
        out["layers"] = [smollm2_layer(layer, layers) for layer in named]
    if ablation["kind"] in ("head", "paper_head") and ablation.get("heads", "all") == "all":
        out["heads"] = HEADS
    if "removed" in ablation:
        out["removed"] = REMOVED
    if "seeds" in ablation:
        out["seeds"] = ablation["seeds"][:1]
    return out


def model_map(paper: dict[str, Any]) -> dict[str, str]:
    """Paper model -> test model: per (model, o_proj source) pair, the source becomes the
    stand-in unless one of the two already is (config.yaml: R1-Distill), so that no o_proj
    replacement swaps equal weights; every other model becomes SmolLM2."""
    noisy: set[str] = set()
    for figure in paper["figures"].values():
        for _, _, series in panel_series(figure):
            ablation = series.get("ablation") or figure["ablation"]
            pair = {series["model"], ablation.get("source")}
            if ablation["kind"] in SOURCE_KINDS and not pair & noisy:
                noisy.add(ablation["source"])
    return {model: STAND_IN if model in noisy else "smollm2" for model in paper["models"]}


def derive(paper: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The test config from the paper config, and the settings replaced (key -> why)."""
    config, replaced = copy.deepcopy(paper), {}
    config["data_dir"] = str(DATA_DIR)  # the run's working directory is not the checkout
    model_of = model_map(paper)
    config["models"] = {test: MODELS[test] for test in sorted(set(model_of.values()))}
    for model_id, model in paper["models"].items():
        if model.get("has_thinking"):
            replaced[f"models.{model_id}.has_thinking"] = f"dropped: {THINKING}"
    for task_id, task in config["tasks"].items():
        task["limit"] = LIMIT
        task["batch_size"] = min(task.get("batch_size", BATCH_SIZE), BATCH_SIZE)
        if task["protocol"] == "generate_until":
            budget = min(task.get("gen_kwargs", {}).get("max_gen_toks", MAX_GEN_TOKS), MAX_GEN_TOKS)
            task["gen_kwargs"] = task.get("gen_kwargs", {}) | {"max_gen_toks": budget}
        if task.get("backend") == "vllm":
            task["backend"] = "hf"
            replaced[f"tasks.{task_id}.backend"] = ON_HF
        if "enable_thinking" in task:
            was = json.dumps(task.pop("enable_thinking"))
            replaced[f"tasks.{task_id}.enable_thinking"] = f"{was} -> null: {THINKING}"
    for figure in config["figures"].values():
        holders = {id(s): s for _, _, s in panel_series(figure) if "ablation" in s}
        depths: dict[int, set[int]] = {}  # id(holder of an ablation) -> its models' depths
        for _, _, series in panel_series(figure):
            holder = series if "ablation" in series else figure
            depths.setdefault(id(holder), set()).add(paper["models"][series["model"]]["num_layers"])
        for key, holder in (holders | {id(figure): figure}).items():
            if key in depths:  # (a figure's own ablation may be overridden by every series)
                holder["ablation"] = shrink_ablation(holder["ablation"], depths[key])
                if "source" in holder["ablation"]:
                    holder["ablation"]["source"] = model_of[holder["ablation"]["source"]]
        for series in {id(s): s for _, _, s in panel_series(figure)}.values():
            series["model"] = model_of[series["model"]]
    return config, replaced


def evaluated(paper: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(model, task) of every series of every figure, and the metrics its panels plot."""
    pairs: dict[tuple[str, str], set[str]] = {}
    for figure in paper["figures"].values():
        for _, panel, series in panel_series(figure):
            metric, _, name = panel["metric"].partition(",")
            pairs.setdefault((series["model"], series["task"]), set()).add(
                f"{metric},{name or 'none'}"
            )
    return pairs


def test_derived_config_keeps_the_papers_tasks_and_figures():
    config, replaced = derive(PAPER)
    on_vllm = [task_id for task_id, task in PAPER["tasks"].items() if task.get("backend") == "vllm"]
    assert replaced == REPLACED | {f"tasks.{task_id}.backend": ON_HF for task_id in on_vllm}
    assert model_map(PAPER) == MODEL_OF and config["models"] == MODELS
    for task_id, task in PAPER["tasks"].items():
        test = config["tasks"][task_id]
        kept = set(task) - SHRUNK_TASK_KEYS
        assert {k: test[k] for k in kept} == {k: task[k] for k in kept}, task_id
        assert test["limit"] == LIMIT and test["batch_size"] <= BATCH_SIZE
        assert test.get("gen_kwargs", {}).get("max_gen_toks", 0) <= MAX_GEN_TOKS
        assert "enable_thinking" not in test
    for figure_id, figure in PAPER["figures"].items():
        test = config["figures"][figure_id]
        for (_, panel, series), (_, test_panel, test_series) in zip(
            panel_series(figure), panel_series(test), strict=True
        ):
            assert test_panel["metric"] == panel["metric"]
            assert test_series["model"] == MODEL_OF[series["model"]]
            other = {k: v for k, v in series.items() if k not in ("ablation", "model")}
            assert {k: v for k, v in test_series.items() if k in other} == other
            paper_ablation = series.get("ablation") or figure["ablation"]
            ablation = test_series.get("ablation") or test["ablation"]
            assert ablation["kind"] == paper_ablation["kind"]
            assert ablation.get("source") == MODEL_OF.get(paper_ablation.get("source"))
            if not picks_its_layers(ablation):
                assert len(ablation["layers"]) == 1 and 0 <= ablation["layers"][0] < 30
    named = {f: config["figures"][f]["ablation"]["layers"] for f in ("fig8", "fig13", "fig18")}
    assert named == {"fig8": [8], "fig13": [29], "fig18": [28]}
    # Every task a paper figure evaluates still is (config.yaml also defines the paper-faithful
    # alternatives of two protocol choices, which no figure uses until a series names them).
    assert {task for _, task in evaluated(config)} == {task for _, task in evaluated(PAPER)}
    assert set(PAPER["tasks"]) - {task for _, task in evaluated(PAPER)} == {
        "gsm8k_1shot_thinking", "gsm8k_cot_long",
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.paper  # ~13 min on 2 cores; in `make test`, alone: `make test-paper`
def test_paper_config_every_figure_offline(tmp_path, record_property):
    config, _ = derive(PAPER)
    datasets.disable_progress_bars()
    cache = tmp_path / "hf"
    build(DATA_DIR, cache)  # what `python -m ablate.offline_datasets` writes: all 57 subjects
    rows = fact_fixture()
    commit = hashlib.sha1(json.dumps(rows).encode()).hexdigest()
    write_config(cache / "datasets", OPENBOOKQA_ADDITIONAL, "additional", {"test": rows}, commit)
    pages = {split: [{"page": page} for page in WIKITEXT_PAGES]
             for split in ("train", "validation", "test")}  # fmt: skip
    commit = hashlib.sha1(json.dumps(WIKITEXT_PAGES).encode()).hexdigest()
    write_config(cache / "datasets", WIKITEXT, "wikitext-2-raw-v1", pages, commit)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cache / "datasets"),
        "HF_HOME": str(tmp_path / "hf-home"),  # empty: no hub cache to fall back on
    }
    start = time.monotonic()
    result = snakemake(workdir, "all", env=env)
    minutes = (time.monotonic() - start) / 60
    print(f"snakemake all on the derived paper config: {minutes:.1f} min")
    record_property("snakemake_minutes", round(minutes, 1))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    for figure_id, figure in PAPER["figures"].items():
        frame = pd.read_csv(workdir / f"results/aggregate/{figure_id}.csv")
        assert len(frame), figure_id
        assert set(frame["metric"]) == {panel["metric"] for panel in figure["panels"]}, figure_id
        assert (workdir / f"results/figures/{figure_id}.png").stat().st_size > 0
    for (model, task_id), metrics in evaluated(config).items():
        task = config["tasks"][task_id]
        record = json.loads((workdir / f"resources/tasks/{task_id}.json").read_text())
        found = json.loads(
            (workdir / f"results/evaluate/{model}/{task_id}/base/results.json").read_text()
        )
        assert metrics <= set(found["results"][task["lm_eval_task"]]), (model, task_id)
        if task["lm_eval_task"].startswith("mmlu"):  # the group and its 57 subjects
            assert len(record["subtasks"]) == 57, task_id
        assert set(record["subtasks"]) <= set(found["results"]), task_id
        for subtask in record["subtasks"]:
            assert found["n_samples"][subtask]["effective"] == LIMIT, (task_id, subtask)
