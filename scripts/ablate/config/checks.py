"""Checks that span config keys: a series naming a model and task that exist, layers and heads
in range for that model, an ablation's source of equal shapes, a backend that serves the task's
protocol and can apply the kind exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ablate.ablations import (
    CONFIG_KINDS,
    LAYER_SET,
    LAYER_SWAP_KINDS,
    QUERY_HEAD_KINDS,
    REMOVAL_ORDERS,
    SOURCE_KINDS,
)
from ablate.backends import BACKENDS
from ablate.config.errors import ConfigError, listed
from ablate.config.runs import evaluation_backends, panel_series, series_ablation
from ablate.paths import MODEL_RECORD


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
                f"{listed(REMOVAL_ORDERS)}; removed: counts of layers, e.g. [1, 2, 4])"
            )
    order, layers = ablation["order"], ablation.get("layers", "all")
    if ablation.get("seeds") is not None and order != "random":
        raise ConfigError(f"{key}.seeds: only order random takes seeds (order is {order})")
    if order == "explicit" and layers == "all":
        raise ConfigError(
            f"{key}.layers: required for order explicit (the layers in removal order, e.g. "
            "[17, 25, 3]; or order: block_influence, angular_block, random)"
        )
    if order != "explicit" and layers != "all":
        raise ConfigError(
            f"{key}.layers: only order explicit takes layers ({order} picks from every layer; "
            f"allowed here: all)"
        )
    most = num_layers
    if order == "explicit":
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
    if kind in QUERY_HEAD_KINDS:
        _check_range(f"{key}.heads", ablation.get("heads", "all"), model["num_heads"], "heads")
    if kind == "kv_group":
        if model["num_kv_heads"] >= model["num_heads"]:
            raise ConfigError(
                f"{key}.kind: kv_group needs grouped-query attention, but model {model_id} has "
                f"{model['num_heads']} query and {model['num_kv_heads']} KV heads "
                f"(allowed here: {listed(k for k in CONFIG_KINDS if k != 'kv_group')})"
            )
        _check_range(
            f"{key}.heads", ablation.get("heads", "all"), model["num_kv_heads"], "KV groups"
        )
    if kind in SOURCE_KINDS:
        source = ablation.get("source")
        if source not in config["models"]:
            raise ConfigError(
                f"{key}.source: {source!r} is not a model id (allowed: {listed(config['models'])})"
            )
        if source == model_id or _same_checkpoint(config["models"][source], model):
            raise ConfigError(
                f"{key}.source: {source} is model {model_id} itself, so every {kind} unit would "
                f"equal the baseline (Δ = 0 by construction; allowed: another model's id)"
            )
        shape = ("num_layers", "num_heads", "num_kv_heads")
        if any(config["models"][source][k] != model[k] for k in shape):
            raise ConfigError(
                f"{key}.source: {kind} needs equal shapes, but {source} and {model_id} "
                f"differ in {listed(k for k in shape if config['models'][source][k] != model[k])}"
            )
    elif ablation.get("source") is not None:
        raise ConfigError(f"{key}.source: only {listed(SOURCE_KINDS)} take a source model")


def _same_checkpoint(a: dict, b: dict) -> bool:
    """Whether two model entries load the same weights (the same hub revision or folder, no
    noise added to either)."""
    where = ("source", "repo_id", "revision", "path", "o_proj_noise")
    return all(a.get(k) == b.get(k) for k in where)


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
            raise ConfigError(f"{key}: unknown backend {backend!r} (allowed: {listed(BACKENDS)})")
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
                    f"(allowed: {listed(models)})"
                )
            if series["task"] not in tasks:
                raise ConfigError(
                    f"{key}.series.{series['label']}.task: unknown task {series['task']!r} "
                    f"(allowed: {listed(tasks)})"
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


def unit_kind(kind: str, model: dict) -> str:
    """The unit kind a config kind sweeps on ``model`` (paper_head: head, or kv_group under
    grouped-query attention, as ablations.sweep expands it)."""
    if kind != "paper_head":
        return kind
    return "kv_group" if model["num_kv_heads"] < model["num_heads"] else "head"


def asked_ablations(config: dict[str, Any], model_id: str) -> dict[tuple[str, str], str]:
    """(unit kind, form) -> the config key of the first series that sweeps it on ``model_id``
    (form: how the series' backend applies ablations)."""
    backends = evaluation_backends(config)
    asked: dict[tuple[str, str], str] = {}
    for figure_id, figure in config["figures"].items():
        for index, _, series in panel_series(figure):
            if series["model"] != model_id:
                continue
            kind = series_ablation(figure, series)["kind"]
            form = BACKENDS[backends[(model_id, series["task"])]].ablation_form
            key = f"figures.{figure_id}.panels[{index}].series.{series['label']}"
            asked.setdefault((unit_kind(kind, config["models"][model_id]), form), key)
    return asked


def check_proof(config: dict[str, Any], model_id: str, proof: dict[str, Any]) -> None:
    """Refuse a kind the config sweeps on ``model_id`` that the model's proof (ablate.proof,
    recorded by download_model) refuses in its backend's form, in one line."""
    for (kind, form), key in asked_ablations(config, model_id).items():
        if why := proof["refused"].get(kind, {}).get(form):
            raise ConfigError(
                f"{key}: models.{model_id} ({proof['model_type']}) cannot be ablated by {kind} in "
                f"the {form.replace('_', ' ')} form of its backend: {why}"
            )


def check_model_proofs(config: dict[str, Any], root: Path = Path()) -> None:
    """:func:`check_proof` for every model whose download recorded a proof under ``root``, and
    :func:`check_source_shapes` with the shapes the downloads recorded (before any job; a model
    not yet downloaded is checked by its download)."""
    shapes = {}
    for model_id in config["models"]:
        marker = root / MODEL_RECORD.format(model=model_id)
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if "block_shapes" in record:
            shapes[model_id] = record["block_shapes"]
        if "proof" in record:
            check_proof(config, model_id, record["proof"])
    check_source_shapes(config, shapes)


def check_source_shapes(config: dict[str, Any], shapes: dict[str, dict[str, Any]]) -> None:
    """A source model must store each tensor a swap takes in the model's shape (o_proj's, or
    every block tensor's for a whole-layer swap), for each series whose model and source have
    ``shapes`` (model id -> :func:`block_shapes` of its checkpoint, as its download recorded)."""
    for figure_id, figure in config["figures"].items():
        for index, _, series in panel_series(figure):
            ablation = series_ablation(figure, series)
            model_id, source_id = series["model"], ablation.get("source")
            if ablation["kind"] not in SOURCE_KINDS or not {model_id, source_id} <= set(shapes):
                continue
            model, source = shapes[model_id]["tensors"], shapes[source_id]["tensors"]
            whole = ablation["kind"] in LAYER_SWAP_KINDS
            out = f".{shapes[model_id]['attention_out']}.weight"
            taken = [name for name in model if whole or name.endswith(out)]
            if differ := [name for name in taken if source.get(name) != model[name]]:
                key = f"figures.{figure_id}.panels[{index}].series.{series['label']}.ablation"
                raise ConfigError(
                    f"{key}.source: {source_id} stores {differ[0]} as "
                    f"{source.get(differ[0], [])}, model {model_id} as {model[differ[0]]} (a "
                    "swap needs equal tensor shapes)"
                )


def block_shapes(folder: Path) -> dict[str, Any]:
    """Every decoder block tensor's shape of the checkpoint in ``folder`` (from its config.json
    alone: a model built on the meta device) and a block's attention output projection."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ablate.anatomy import Anatomy

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    anatomy = Anatomy.of(model)
    tensors = {
        name: list(parameter.shape)
        for name, parameter in model.named_parameters()
        if name.startswith(f"{anatomy.layers}.")
    }
    return {"tensors": tensors, "attention_out": anatomy.attention_out}
