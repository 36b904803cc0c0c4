"""A figure expanded into what it plots and what must be evaluated: runs (one plotted point
each), the (model, task, unit) evaluations, each (model, task)'s backend, and the chunks of units
that evaluation jobs take."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ablate.ablations import HEAD_KINDS, Ablation, sweep
from ablate.backends import BACKENDS, serving, tensor_parallel
from ablate.config.errors import ConfigError, listed


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
                    f"{series['task']} is one (allowed: {listed(serving(task['protocol']))})"
                )
            kind, model = series_ablation(figure, series)["kind"], series["model"]
            options = (config.get("evaluation") or {}).get(backend) or {}
            gpus = tensor_parallel(config["models"][model], options)
            if kind in BACKENDS[backend].single_gpu_kinds and gpus > 1:
                raise ConfigError(
                    f"{key}: {backend} applies {kind} ablations exactly on one GPU only, and "
                    f"figure {figure_id} sweeps them on model {model} over {gpus} GPUs "
                    f"(allowed: hf; or models.{model}.gpus and evaluation.{backend}.engine_args."
                    "tensor_parallel_size at most 1)"
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
