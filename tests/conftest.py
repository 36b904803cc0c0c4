"""Shared constants, the Snakemake runner, and fixtures: the embedded SmolLM2 checkpoint,
converted once and cached across sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from ablate.embedded import embedded_checkpoint

# One torch thread per test process: the 2 cores are shared (Snakemake jobs, a second pytest),
# and an oversubscribed OpenMP team makes a SmolLM2 forward pass ~40x slower (measured 3.5 s vs
# 0.09 s with one thread).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = (REPO.parent / "shared" / "data").resolve()
# The embedded SmolLM2-135M as a config's model entry.
SMOLLM2 = {"source": "embedded", "params_b": 0.135, "num_layers": 30, "num_heads": 9,
           "num_kv_heads": 3}  # fmt: skip


def snakemake_command(
    workdir: Path,
    *args: str,
    configfile: Path | None = None,
    snakefile: Path = REPO / "Snakefile",
    cores: int = 2,
) -> list[str]:
    """Snakemake in ``workdir`` on ``configfile`` (default: the config.yaml written there)."""
    return [sys.executable, "-m", "snakemake", *args, "--snakefile", str(snakefile),
            "--directory", str(workdir), "--cores", str(cores),
            "--configfile", str(configfile or workdir / "config.yaml")]  # fmt: skip


def snakemake(workdir: Path, *args: str, env: dict[str, str] | None = None, **options):
    """Run :func:`snakemake_command` with ``env`` added to the environment; output captured."""
    return subprocess.run(
        snakemake_command(workdir, *args, **options),
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def cached_checkpoint(request, name: str, **options) -> Path:
    """The embedded model linked once into pytest's cache (converted once per machine, as the
    workflow converts it); the lock keeps parallel test workers (pytest -n) from writing the
    same folder at once."""
    folder = Path(request.config.cache.mkdir(name))
    with FileLock(f"{folder}.lock"):
        if not (folder / "model.safetensors").exists():
            embedded_checkpoint(folder, **options)
    return folder


@pytest.fixture(scope="session")
def embedded_dir(request) -> Path:
    return cached_checkpoint(request, "embedded-smollm2")


@pytest.fixture(scope="session")
def perturbed_dir(request) -> Path:
    return cached_checkpoint(request, "embedded-smollm2-perturbed", o_proj_noise=0.5, seed=0)


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture()
def model(embedded_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()


PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many"


@pytest.fixture()
def batch(tokenizer):
    """One tokenized prompt for the embedded model."""
    return tokenizer([PROMPT], return_tensors="pt")


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def greedy(model, batch, n: int = 12) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=n, do_sample=False, use_cache=True)


def state_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def without_layer(model, layer: int):
    """A copy of ``model`` with decoder layer ``layer`` deleted by hand."""
    import families
    from ablate.anatomy import Anatomy

    return families.without_layer(model, Anatomy.of(model), layer)


# Fake unit results of a 2-layer model ``m`` on task ``t``, for the aggregation's checks.
FAKE_CONFIG = {
    "models": {"m": {"source": "embedded", "num_layers": 2, "num_heads": 2, "num_kv_heads": 1}},
    "tasks": {"t": {"lm_eval_task": "lmt", "protocol": "loglikelihood"}},
    "figures": {"f": {"title": "f", "ablation": {"kind": "layer"},
                      "series": [{"label": "s", "model": "m", "task": "t"}],
                      "panels": [{"metric": "acc"}, {"metric": "acc_ce"}]}},
}  # fmt: skip
FAKE_PROVENANCE = {"model_revision": "abc", "task_versions": {"lmt": 1.0}, "num_fewshot": None,
                   "limit": 4, "dtype": "float32", "packages": {"lm_eval": "0.4.13"}}  # fmt: skip


def write_unit(root: Path, ablation: str, correct: list[int], **provenance) -> Path:
    """A unit's results.json and samples.jsonl (and the baseline's proxies) with per-document
    accuracies ``correct``."""
    folder = root / "m" / "t" / ablation
    folder.mkdir(parents=True, exist_ok=True)
    acc = sum(correct) / len(correct)
    record = {
        "results": {"lmt": {"acc,none": acc, "acc_stderr,none": 0.1, "acc_ce,none": 1 - acc}},
        "n_samples": {"lmt": {"original": 100, "effective": len(correct)}},
        "provenance": {**FAKE_PROVENANCE, **provenance},
    }
    (folder / "results.json").write_text(json.dumps(record))
    samples = [
        {"task": "lmt", "doc_id": i, "filter": "none", "acc": c, "acc_ce": 1 - c}
        for i, c in enumerate(correct)
    ]
    (folder / "samples.jsonl").write_text("\n".join(map(json.dumps, samples)) + "\n")
    if ablation == "base":
        (folder / "proxies.csv").write_text(
            "layer,block_influence,angular_distance\n0,0.5,0.3\n1,0.1,0.1\n"
        )
    return folder


@pytest.fixture()
def results(tmp_path) -> Path:
    """Fake results of FAKE_CONFIG's figure f: a baseline and both layers."""
    write_unit(tmp_path, "base", [1, 1, 1, 0])
    write_unit(tmp_path, "layer0", [0, 0, 1, 0])
    write_unit(tmp_path, "layer1", [1, 1, 1, 1])
    return tmp_path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The paper-config run (~11 min, one test) first, so that under pytest -n one worker starts
    it while the other takes every other file, instead of it running alone at the end (with
    --no-loadscope-reorder: xdist otherwise sends the files with the most tests first)."""
    items.sort(key=lambda item: item.get_closest_marker("paper") is None)
