"""Task folders and task YAMLs as lm-eval indexes them, and what prefetch_task recorded of each
task (its settings, the metrics it produces and how it aggregates them), checked against the
config before any job."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ablate.config.errors import ConfigError, listed
from ablate.config.runs import panel_series
from ablate.lm_eval_tasks import TASKS_DIR
from ablate.paths import EVALUATIONS, TASK_RECORD


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs without resolving their tags (``!function utils.x``)."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _task_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)


def yaml_errors(folders: Sequence[str | Path]) -> list[str]:
    """One line per task YAML under ``folders`` that does not parse (lm-eval skips those, so
    the task it defines is only "unknown"): its file, line and YAML error."""
    errors = []
    for folder in folders:
        for path in sorted(Path(folder).glob("**/*.yaml")):
            try:
                _task_yaml(path)
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f"line {mark.line + 1}: " if mark is not None else ""
                problem = getattr(error, "problem", None) or " ".join(str(error).split())
                errors.append(f"{path}: {where}{problem}")
    return errors


@functools.cache
def folder_task_names(folder: Path) -> frozenset[str]:
    """The task, group and tag names lm-eval indexes in ``folder`` (its YAMLs, includes unread)."""
    names: set[str] = set()
    for path in folder.glob("**/*.yaml"):
        try:
            cfg = _task_yaml(path)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # lm-eval skips it too
        if not isinstance(cfg, dict):
            continue
        tags = cfg.get("tag")
        tags = [tags] if isinstance(tags, str) else tags if isinstance(tags, list) else []
        names.update(v for v in [cfg.get("task"), cfg.get("group"), *tags] if isinstance(v, str))
    return frozenset(names)


def resolve_task_files(config: dict[str, Any]) -> None:
    """Check ``task_paths`` (folders relative to the working directory), and turn a task given as
    ``lm_eval_task: path/to/task.yaml`` into its ``task:`` name with its folder added to
    ``task_paths``, in place."""
    paths = config.setdefault("task_paths", [])
    here = f"relative to the working directory {Path.cwd()}"
    for index, folder in enumerate(paths):
        if not Path(folder).is_dir():
            raise ConfigError(f"task_paths[{index}]: no folder {folder!r} ({here})")
    for task_id, task in config["tasks"].items():
        spec, key = task["lm_eval_task"], f"tasks.{task_id}.lm_eval_task"
        if not spec.endswith((".yaml", ".yml")):
            continue
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"{key}: no file {spec!r} ({here})")
        try:
            cfg = _task_yaml(path)
        except yaml.YAMLError as error:
            raise ConfigError(f"{key}: {spec}: {' '.join(str(error).split())}") from None
        if not isinstance(cfg, dict) or not isinstance(cfg.get("task"), str):
            raise ConfigError(
                f"{key}: {spec} has no task: name (allowed: a task name, or a task YAML with one)"
            )
        if path.parent.resolve() == Path.cwd():
            raise ConfigError(
                f"{key}: move {spec} into a folder of its own (lm-eval reads every YAML of the "
                "task's folder, and the working directory holds the results)"
            )
        task["lm_eval_task"] = cfg["task"]
        if str(path.parent) not in paths:
            paths.append(str(path.parent))


def task_folders(config: dict[str, Any], task: dict[str, Any]) -> list[str]:
    """The ``task_paths`` folders ``task``'s jobs index: those defining its lm-eval name (so a
    folder added for another task changes none of its jobs); all of them for a local task that
    neither they nor the workflow's folder define (prefetch_task then names close ones)."""
    paths, name = config.get("task_paths", []), task["lm_eval_task"]
    if not paths:
        return []
    found = [p for p in paths if name in folder_task_names(Path(p).resolve())]
    if found or not task.get("local", True) or name in folder_task_names(TASKS_DIR):
        return found
    return list(paths)


def task_settings(config: dict[str, Any], task_id: str) -> dict[str, Any]:
    """The task's settings as its jobs get them: with the ``task_paths`` folders that define its
    lm-eval task (none: no key, so a folder added for another task changes none of its jobs)."""
    task = config["tasks"][task_id]
    folders = task_folders(config, task)
    return task | {"task_paths": folders} if folders else task


def task_metric_requests(config: dict[str, Any], task_id: str) -> list[tuple[str, str]]:
    """(config key, metric) of every panel that plots a series of task ``task_id``."""
    return list(
        dict.fromkeys(
            (f"figures.{figure_id}.panels[{index}].metric", panel["metric"])
            for figure_id, figure in config["figures"].items()
            for index, panel, series in panel_series(figure)
            if series["task"] == task_id
        )
    )


def check_task_metrics(
    requests: Sequence[tuple[str, str]],
    produced: Sequence[str],
    task_id: str,
    name: str,
    aggregations: Mapping[str, str],
) -> None:
    """Every requested ``metric[,filter]`` must be one the built task reports (``produced``),
    aggregated over documents in a way the paired statistics can resample (``aggregations``:
    lm-eval's aggregation name per metric)."""
    from ablate.stats import PAIRED_AGGREGATIONS  # scipy: not at the workflow's parse

    for key, metric in requests:
        if (metric if "," in metric else f"{metric},none") not in produced:
            allowed = ", ".join(repr(m.removesuffix(",none")) for m in sorted(produced))
            raise ConfigError(
                f"{key}: {metric!r} is not produced by lm-eval task {name} of tasks.{task_id} "
                f"(allowed: {allowed})"
            )
        aggregation = aggregations.get(metric.split(",")[0], "mean")
        if aggregation not in PAIRED_AGGREGATIONS:
            raise ConfigError(
                f"{key}: {metric!r} of lm-eval task {name} is aggregated by {aggregation}, which "
                f"the paired statistics cannot resample (allowed: {listed(PAIRED_AGGREGATIONS)})"
            )


def check_task_records(config: dict[str, Any], root: Path = Path()) -> None:
    """Compare each task with what prefetch_task recorded for its id under ``root``: results are
    kept per model and task id, so a task whose settings differ from those of existing results
    would overwrite them (refused, naming the keys); and the figures' metrics must be the built
    task's. One small JSON file per task; a task never prefetched is not checked."""
    used = {s["task"] for figure in config["figures"].values() for _, _, s in panel_series(figure)}
    for task_id in sorted(used):
        marker = root / TASK_RECORD.format(task=task_id)
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        task, recorded = config["tasks"][task_id], record.get("settings")
        if recorded is None:
            continue
        differ = sorted(k for k in recorded.keys() | task.keys() if recorded.get(k) != task.get(k))
        if not differ:
            check_task_metrics(
                task_metric_requests(config, task_id),
                record["metrics"],
                task_id,
                task["lm_eval_task"],
                record.get("aggregations", {}),
            )
        elif any((root / EVALUATIONS).glob(f"*/{task_id}/*/results.json")):
            changes = ", ".join(
                f"{k} {task.get(k)!r} (results: {recorded.get(k)!r})" for k in differ
            )
            raise ConfigError(
                f"tasks.{task_id}: {changes}: {EVALUATIONS}/*/{task_id}/ holds results of other "
                f"settings ({marker}), which this config would overwrite; give the task another "
                f"id, or move those results and {marker} away"
            )
