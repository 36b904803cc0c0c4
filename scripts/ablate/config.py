"""Checks and expansion of the workflow config beyond its JSON schema.

The schema (``workflow/schemas/config.schema.yaml``) checks shapes and types; this module checks
what spans keys (a series naming a model that exists, a head in range for that model, a metric its
task's protocol produces) and expands each figure into the evaluation runs it needs.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ablate.ablations import (
    CONFIG_KINDS,
    HEAD_KINDS,
    LAYER_SET,
    REMOVAL_ORDERS,
    SOURCE_KINDS,
    Ablation,
    sweep,
)
from ablate.backends import BACKENDS, serving
from ablate.lm_eval_tasks import TASKS_DIR
from ablate.paths import EVALUATIONS, TASK_RECORD


class ConfigError(ValueError):
    """A config value the workflow cannot run; the message names the key and what is allowed."""


@dataclass(frozen=True)
class Run:
    """One plotted point: a series' model and task under one ablation, and its baseline."""

    figure: str
    panel: int
    series: str
    model: str
    task: str
    metric: str
    kind: str
    layer: int  # the ablated layer (cumulative kinds: the last one; layer_set: how many)
    head: int | None  # query head (head, paper_head) or KV group (kv_group) within ``layer``
    ablation: str  # ablation id, the results folder


def schema_error(config: dict[str, Any], schema: dict[str, Any]) -> str | None:
    """The most relevant JSON-schema violation as one line: key path, problem, allowed values."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is None:
        return None
    key = ".".join(str(part) for part in error.absolute_path) or "<top level>"
    allowed = ""
    if error.validator == "enum":
        allowed = f" (allowed: {_allowed(error.validator_value)})"
    elif error.validator == "additionalProperties":
        allowed = f" (allowed: {_allowed(error.schema.get('properties', {}))})"
    return f"{key}: {error.message}{allowed}"


SCHEMA = Path(__file__).resolve().parents[2] / "workflow/schemas/config.schema.yaml"


def load_config(configfile: Path) -> dict[str, Any]:
    """The config as the workflow sees it: validated, the schema's defaults filled in; a key
    given twice or a syntax error is a ConfigError naming the file and line."""
    config = load_config_file(configfile)
    validate_config(config)
    return config


def validate_config(config: dict[str, Any]) -> None:
    """Check ``config`` against the schema (one line naming the key), fill the schema's
    defaults in place, then the cross-key checks. Raises ConfigError."""
    from snakemake.utils import validate

    schema = yaml.safe_load(SCHEMA.read_text())
    if problem := schema_error(config, schema):
        raise ConfigError(problem)
    validate(config, schema=str(SCHEMA), set_default=True)
    resolve_task_files(config)
    check_config(config)


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping key given twice (PyYAML keeps the last, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges; keys given beside it may override it
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:
                continue  # an unhashable key: super() names it
            if first is not None:
                raise ConfigError(f"duplicate key {key!r} (lines {first} and {line})")
            lines[key] = line
        return super().construct_mapping(node, deep)


def load_config_file(path: Path | str) -> Any:
    """A config file as Snakemake reads it (JSON or YAML), or ConfigError naming the file: a key
    given twice and both its lines, or the line, column and reason of a syntax error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except yaml.MarkedYAMLError as error:
        try:
            return json.loads(text)  # Snakemake reads JSON first; tab-indented JSON is no YAML
        except ValueError:
            raise ConfigError(f"{path}:{_yaml_reason(error)}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: {' '.join(str(error).split())}") from None


def _yaml_reason(error: yaml.MarkedYAMLError) -> str:
    """``line:column: problem (context at line n)`` of a PyYAML error, one line, 1-based."""
    mark = error.problem_mark or error.context_mark
    where = f"{mark.line + 1}:{mark.column + 1}:" if mark else ""
    reason = f"{where} {error.problem or error.context}"
    if error.problem and error.context:
        reason += f" ({error.context}"
        if error.context_mark:
            reason += f" at line {error.context_mark.line + 1}"
        reason += ")"
    return reason


def _allowed(values) -> str:
    return ", ".join(str(v) for v in values)


def panel_series(figure: dict[str, Any]) -> Iterator[tuple[int, dict, dict]]:
    """(panel index, panel, series) for every series drawn in every panel."""
    for index, panel in enumerate(figure["panels"]):
        for series in panel.get("series") or figure.get("series") or []:
            yield index, panel, series


def series_ablation(figure: dict[str, Any], series: dict[str, Any]) -> dict[str, Any]:
    return series.get("ablation") or figure["ablation"]


def figure_runs(config: dict[str, Any], figure_id: str) -> list[Run]:
    figure = config["figures"][figure_id]
    runs = []
    for index, panel, series in panel_series(figure):
        ablation = series_ablation(figure, series)
        model = config["models"][series["model"]]
        for unit, head in sweep(ablation, model):
            runs.append(
                Run(
                    figure=figure_id,
                    panel=index,
                    series=series["label"],
                    model=series["model"],
                    task=series["task"],
                    metric=panel["metric"],
                    kind=ablation["kind"],
                    layer=unit.position,
                    head=head,
                    ablation=unit.id,
                )
            )
    return runs


def figure_evaluations(config: dict[str, Any], figure_id: str) -> list[tuple[str, str, str]]:
    """Sorted (model, task, ablation id) a figure needs, baselines ('base') included."""
    needed = set()
    for run in figure_runs(config, figure_id):
        needed.add((run.model, run.task, run.ablation))
        needed.add((run.model, run.task, "base"))
    return sorted(needed)


def evaluation_backends(config: dict[str, Any]) -> dict[tuple[str, str], str]:
    """The backend of every (model, task) a figure evaluates: the figure's ``backend``, else the
    task's, else hf. One (model, task) has one backend, so its baseline and units are comparable."""
    chosen: dict[tuple[str, str], tuple[str, str]] = {}  # -> (backend, the key that chose it)
    for figure_id, figure in config["figures"].items():
        for _, _, series in panel_series(figure):
            task = config["tasks"][series["task"]]
            if figure.get("backend"):
                backend, key = figure["backend"], f"figures.{figure_id}.backend"
            else:
                backend, key = task.get("backend", "hf"), f"tasks.{series['task']}.backend"
            if task["protocol"] not in BACKENDS[backend].protocols:
                raise ConfigError(
                    f"{key}: {backend} does not run {task['protocol']} tasks, and task "
                    f"{series['task']} is one (allowed: {_allowed(serving(task['protocol']))})"
                )
            kind = series_ablation(figure, series)["kind"]
            if kind in BACKENDS[backend].refused_kinds:
                usable = [name for name, b in BACKENDS.items() if kind not in b.refused_kinds]
                raise ConfigError(
                    f"{key}: {backend} cannot apply {kind} ablations exactly, and figure "
                    f"{figure_id} sweeps them on task {series['task']} (allowed: "
                    f"{_allowed(usable)}; or define a second task)"
                )
            pair = (series["model"], series["task"])
            first = chosen.setdefault(pair, (backend, key))
            if first[0] != backend:
                raise ConfigError(
                    f"{key}: {backend} for model {pair[0]} on task {pair[1]}, but {first[1]} "
                    f"gives it {first[0]} (allowed: {first[0]}; or define a second task)"
                )
    return {pair: backend for pair, (backend, _) in chosen.items()}


@dataclass(frozen=True)
class Chunk:
    """Ablation units of one (model, task) evaluated by one job, with one model load."""

    model: str
    task: str
    ablations: tuple[Ablation, ...]
    backend: str = "hf"

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(ablation.id for ablation in self.ablations)

    @property
    def name(self) -> str:
        """Rule name (also the SLURM job name): model, task and the chunk's first unit."""
        first = re.sub(r"\W", "_", self.ids[0])
        return f"evaluate_{self.model}_{self.task}_{first}"

    @property
    def label(self) -> str:
        """Log and benchmark file stem, e.g. ``layer0-layer7``."""
        first, last = self.ids[0], self.ids[-1]
        return first if first == last else f"{first}-{last}"

    @property
    def source(self) -> str | None:
        return self.ablations[0].source


def evaluation_chunks(config: dict[str, Any]) -> list[Chunk]:
    """Every unit any figure needs, once, split into jobs of ``evaluation.units_per_job``.

    A chunk holds units of one ablation kind and o_proj source (head kinds: of one layer, which
    share their whole prefix) in layer/head order, so a figure target pulls in only chunks of
    its own sweep; the baseline is a chunk of its own. Chunks depend on the whole config, not on
    the target, so a unit is always computed by the same job.
    """
    size = config.get("evaluation", {}).get("units_per_job", 1)
    groups: dict[tuple, set[Ablation]] = {}
    for figure_id in config["figures"]:
        for model, task, ablation_id in figure_evaluations(config, figure_id):
            unit = Ablation.parse(ablation_id)
            layer = unit.layer if unit.kind in HEAD_KINDS else -1
            groups.setdefault((model, task, unit.kind, unit.source or "", layer), set()).add(unit)
    backends = evaluation_backends(config)
    chunks = []
    for (model, task, *_), units in sorted(groups.items()):
        ordered = sorted(units, key=lambda unit: unit.sort_key)
        for start in range(0, len(ordered), size):
            part = tuple(ordered[start : start + size])
            chunks.append(Chunk(model, task, part, backends[(model, task)]))
    return chunks


def _check_range(key: str, values, count: int, what: str) -> None:
    if values == "all":
        return
    bad = [v for v in values if not 0 <= v < count]
    if bad:
        raise ConfigError(f"{key}: {what} {bad} out of range (allowed: 0..{count - 1})")


def _check_removal(key: str, ablation: dict, num_layers: int) -> None:
    """A layer_set sweep: an order, counts it can remove, an explicit order's distinct layers."""
    if ablation["kind"] != LAYER_SET:
        if given := [k for k in ("order", "removed", "seeds") if k in ablation]:
            raise ConfigError(f"{key}.{given[0]}: only kind {LAYER_SET} takes it")
        return
    for needed in ("order", "removed"):
        if needed not in ablation:
            raise ConfigError(
                f"{key}.{needed}: required for kind {LAYER_SET} (order allowed: "
                f"{_allowed(REMOVAL_ORDERS)}; removed: counts of layers, e.g. [1, 2, 4])"
            )
    order, layers = ablation["order"], ablation.get("layers", "all")
    if ablation.get("seeds") is not None and order != "random":
        raise ConfigError(f"{key}.seeds: only order random takes seeds (order is {order})")
    most = num_layers
    if order == "explicit" and layers != "all":
        if len(set(layers)) != len(layers):
            raise ConfigError(f"{key}.layers: an explicit order names each layer once: {layers}")
        most = len(layers)
    if too_many := [n for n in ablation["removed"] if n > most]:
        raise ConfigError(f"{key}.removed: {too_many} more layers than {order} orders "
                          f"(allowed: 1..{most})")  # fmt: skip


def _check_ablation(key: str, ablation: dict, model_id: str, config: dict) -> None:
    model = config["models"][model_id]
    kind = ablation["kind"]
    _check_range(f"{key}.layers", ablation.get("layers", "all"), model["num_layers"], "layers")
    _check_removal(key, ablation, model["num_layers"])
    if kind in ("head", "paper_head"):
        _check_range(f"{key}.heads", ablation.get("heads", "all"), model["num_heads"], "heads")
    if kind == "kv_group":
        if model["num_kv_heads"] >= model["num_heads"]:
            raise ConfigError(
                f"{key}.kind: kv_group needs grouped-query attention, but model {model_id} has "
                f"{model['num_heads']} query and {model['num_kv_heads']} KV heads "
                f"(allowed here: {_allowed(k for k in CONFIG_KINDS if k != 'kv_group')})"
            )
        _check_range(
            f"{key}.heads", ablation.get("heads", "all"), model["num_kv_heads"], "KV groups"
        )
    if kind in SOURCE_KINDS:
        source = ablation.get("source")
        if source not in config["models"]:
            raise ConfigError(
                f"{key}.source: {source!r} is not a model id (allowed: {_allowed(config['models'])})"
            )
        shape = ("num_layers", "num_heads", "num_kv_heads")
        if any(config["models"][source][k] != model[k] for k in shape):
            raise ConfigError(
                f"{key}.source: {kind} needs equal shapes, but {source} and {model_id} "
                f"differ in {_allowed(k for k in shape if config['models'][source][k] != model[k])}"
            )
    elif ablation.get("source") is not None:
        raise ConfigError(f"{key}.source: only {_allowed(SOURCE_KINDS)} take a source model")


# The workflow's own rule names: a figure of one of these names (each figure is a rule too)
# would clash with it. Evaluation rules are named evaluate_<model>_<task>_<first unit>.
RULE_NAMES = ("all", "download_model", "prefetch_task", "aggregate_figure", "check_claims",
              "plot_figure")  # fmt: skip


def check_config(config: dict[str, Any]) -> None:
    """Raise ConfigError on the first cross-key problem, naming its key path."""
    models, tasks = config["models"], config["tasks"]
    for figure_id in config["figures"]:
        if figure_id in RULE_NAMES or figure_id.startswith("evaluate_"):
            raise ConfigError(
                f"figures.{figure_id}: a figure id names its target, and {figure_id!r} is a rule "
                f"of the workflow (reserved: {', '.join(RULE_NAMES)}, evaluate_*)"
            )
    for model_id, model in models.items():
        if model["source"] == "hub" and not model.get("repo_id"):
            raise ConfigError(f"models.{model_id}.repo_id: required when source is hub")
        if model["source"] == "local" and not Path(model.get("path", "")).is_dir():
            raise ConfigError(
                f"models.{model_id}.path: {model.get('path')!r} is no checkpoint folder (needed "
                f"when source is local; relative to the working directory {Path.cwd()})"
            )
        if model.get("attn_implementation") == "flex_attention" and model["device"] == "cpu":
            raise ConfigError(
                f"models.{model_id}.attn_implementation: flex_attention is compiled for the GPU; "
                "torch's CPU build of it fails for some shapes (on cpu allowed: sdpa, eager)"
            )
    backends = [(f"tasks.{t}.backend", task.get("backend", "hf")) for t, task in tasks.items()]
    backends += [
        (f"figures.{f}.backend", fig["backend"])
        for f, fig in config["figures"].items()
        if "backend" in fig
    ]
    for key, backend in backends:
        if backend not in BACKENDS:
            raise ConfigError(f"{key}: unknown backend {backend!r} (allowed: {_allowed(BACKENDS)})")
    for task_id, task in tasks.items():
        if task.get("enable_thinking") is not None and not task.get("chat_template"):
            raise ConfigError(
                f"tasks.{task_id}.enable_thinking: the switch lives in the chat template; "
                "set chat_template: true or enable_thinking: null"
            )
    for figure_id, figure in config["figures"].items():
        for index, _, series in panel_series(figure):
            key = f"figures.{figure_id}.panels[{index}]"
            if series["model"] not in models:
                raise ConfigError(
                    f"{key}.series.{series['label']}.model: unknown model {series['model']!r} "
                    f"(allowed: {_allowed(models)})"
                )
            if series["task"] not in tasks:
                raise ConfigError(
                    f"{key}.series.{series['label']}.task: unknown task {series['task']!r} "
                    f"(allowed: {_allowed(tasks)})"
                )
            task, model = tasks[series["task"]], models[series["model"]]
            # The metric is checked against what the built task produces (prefetch_task).
            if task.get("enable_thinking") is not None and not model.get("has_thinking"):
                raise ConfigError(
                    f"tasks.{series['task']}.enable_thinking: model {series['model']} has no "
                    "thinking switch in its chat template (allowed: null; or set "
                    f"models.{series['model']}.has_thinking: true)"
                )
            _check_ablation(
                f"{key}.ablation", series_ablation(figure, series), series["model"], config
            )
        if not any(True for _ in panel_series(figure)):
            raise ConfigError(
                f"figures.{figure_id}: no series (set series on the figure or its panels)"
            )
    evaluation_backends(config)


# --- task folders, task YAMLs, and what prefetch_task recorded ------------------------------


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs without resolving their tags (``!function utils.x``)."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _task_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)


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
                f"the paired statistics cannot resample (allowed: {_allowed(PAIRED_AGGREGATIONS)})"
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
