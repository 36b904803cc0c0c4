"""Backends are peers: a third one is a module plus a registry entry, and the config checks, the
chunks, the planner and the job runner take it without any other change."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from ablate import backends
from ablate.ablations import Ablation
from ablate.backends import BACKENDS, Backend
from ablate.config import ConfigError, check_config, evaluation_chunks, load_config
from ablate.cost import chunk_seconds, prior_rates
from ablate.job import Job
from ablate.plan import plan

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = str(REPO.parent / "shared" / "data")
TOY = Backend(
    module="toy_backend",
    protocols=("loglikelihood",),
    conda_env="eval.yaml",
    prior_rates={("cpu", "prefill"): 1e-3, ("cuda", "prefill"): 1e-6},
    job_overhead_s={"cpu": 1.0, "cuda": 10.0},
)


@pytest.fixture()
def toy(monkeypatch):
    monkeypatch.setitem(BACKENDS, "toy", TOY)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def test_config_chunks_and_planner_take_a_registered_backend(toy, tmp_path):
    config = load_config(REPO / "workflow/config/demo.yaml")
    config["tasks"]["kv_retrieval"]["backend"] = "toy"
    check_config(config)
    assert {c.backend for c in evaluation_chunks(config) if c.task == "kv_retrieval"} == {"toy"}
    [row] = plan(["fig5"], config, tmp_path)
    assert (row["backend"], row["other_backend"]) == ("toy", "hf")
    model, task = config["models"]["smollm2"], config["tasks"]["kv_retrieval"]
    seconds = chunk_seconds(model, task, (Ablation("base"),), prior_rates(), backend="toy")
    assert seconds == pytest.approx(1.0 + task["limit"] * 400 * 4 * 1e-3 * 0.135)
    broken = copy.deepcopy(config)
    broken["tasks"]["gsm8k_1shot"]["backend"] = "toy"
    with pytest.raises(
        ConfigError, match=r"toy does not run generate_until tasks.*\(allowed: hf, vllm\)"
    ):
        check_config(broken)


def test_unknown_backend_is_refused_with_the_registry(toy):
    config = load_config(REPO / "workflow/config/demo.yaml")
    config["tasks"]["kv_retrieval"]["backend"] = "sglang"
    with pytest.raises(ConfigError, match=r"unknown backend 'sglang' \(allowed: hf, vllm, toy\)"):
        check_config(config)


@pytest.mark.slow
def test_a_toy_backend_job_scores_as_the_hf_backend(toy, embedded_dir, tmp_path):
    task = {"lm_eval_task": "kv_retrieval_short", "protocol": "loglikelihood", "limit": 3,
            "batch_size": 4}  # fmt: skip
    model = {"dtype": "float32", "device": "cpu"}
    units = [Ablation.parse(a) for a in ("base", "layer0")]
    for backend in ("hf", "toy"):
        job = Job(embedded_dir, model, task, DATA_DIR, backend=backend, prefix_reuse=False)
        backends.run(job, [(unit, tmp_path / backend / unit.id) for unit in units])
    for unit in units:
        hf, toy_result = (
            json.loads((tmp_path / b / unit.id / "results.json").read_text()) for b in ("hf", "toy")
        )
        assert toy_result["results"] == hf["results"]
        assert toy_result["provenance"]["backend"] == "toy"
        assert toy_result["provenance"]["packages"]["toy_backend"] == "1"
    assert "toy_backend" in sys.modules  # imported by the registry, by name


def test_the_cluster_environment_installs_the_lock():
    """envs/eval.yaml (every rule's conda environment but vLLM's) pins exactly what
    requirements.lock pins, which `make setup` and CI install: `make lock` writes both."""
    lock = [line for line in (REPO / "requirements.lock").read_text().splitlines()
            if re.match(r"^[A-Za-z0-9].*==", line)]  # fmt: skip
    env = yaml.safe_load((REPO / "envs/eval.yaml").read_text())
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert pip == lock and len(lock) > 100
    assert "torch==2.13.0" in lock  # no local "+cpu" tag: a GPU cluster takes the CUDA build
