"""Shared constants, the Snakemake runner, and fixtures: the embedded SmolLM2 checkpoint,
converted once and cached across sessions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from ablate.embedded import convert_embedded

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
    """The embedded model converted once into pytest's cache; the lock keeps parallel test
    workers (pytest -n) from converting into the same folder at once."""
    folder = Path(request.config.cache.mkdir(name))
    with FileLock(f"{folder}.lock"):
        if not (folder / "model.safetensors").exists():
            convert_embedded(folder, **options)
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The paper-config run (~11 min, one test) first, so that under pytest -n one worker starts
    it while the other takes every other file, instead of it running alone at the end (with
    --no-loadscope-reorder: xdist otherwise sends the files with the most tests first)."""
    items.sort(key=lambda item: item.get_closest_marker("paper") is None)
