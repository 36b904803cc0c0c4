"""Shared fixtures: the embedded SmolLM2 checkpoint, converted once and cached across sessions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ablate.embedded import convert_embedded

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def embedded_dir(request) -> Path:
    folder = Path(request.config.cache.mkdir("embedded-smollm2"))
    if not (folder / "model.safetensors").exists():
        convert_embedded(folder)
    return folder


@pytest.fixture(scope="session")
def perturbed_dir(request) -> Path:
    folder = Path(request.config.cache.mkdir("embedded-smollm2-perturbed"))
    if not (folder / "model.safetensors").exists():
        convert_embedded(folder, o_proj_noise=0.5, seed=0)
    return folder


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture()
def model(embedded_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
