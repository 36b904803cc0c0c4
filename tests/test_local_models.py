"""A config whose models are other families, as a user would write it: tiny random-weight
checkpoints on disk (`source: local`), each through the whole workflow. Each plans and runs its
ablations exactly (its download proves each kind on a twin, each job on the loaded model), or is
refused in one line before any evaluation job."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
import transformers
import yaml

from conftest import DATA_DIR, snakemake
from families import COMMON, build

pytestmark = pytest.mark.slow
# family -> config id; tiny models with the embedded tokenizer's vocabulary. StableLM is in no
# list of this project's: the sweep runs on it because its invariants hold there.
MODELS = {"GPT-NeoX / Pythia (parallel residual)": "pythia", "Gemma-3 text": "gemma3",
          "Mistral (all layers sliding)": "mistral", "Falcon (new decoder)": "falcon",
          "StableLM": "stablelm"}  # fmt: skip


def checkpoint(family: str, folder, tokenizer_dir):
    if family == "StableLM":
        torch.manual_seed(0)
        config = transformers.StableLmConfig(**(COMMON | {"vocab_size": 49152}))
        model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        model = build(family, vocab_size=49152)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return model.config.get_text_config()


def test_other_families_run_through_the_workflow(tmp_path, embedded_dir):
    models = {}
    for family, model_id in MODELS.items():
        text = checkpoint(family, tmp_path / "checkpoints" / model_id, embedded_dir)
        models[model_id] = {
            "source": "local", "path": f"checkpoints/{model_id}", "num_layers": 3,
            "num_heads": text.num_attention_heads,
            "num_kv_heads": 2 if model_id != "pythia" else text.num_attention_heads,
        }  # fmt: skip
    config = {
        "data_dir": str(DATA_DIR),
        "evaluation": {"units_per_job": 4},
        "models": models,
        "tasks": {"kv": {"lm_eval_task": "kv_retrieval_short", "protocol": "loglikelihood",
                         "limit": 4, "batch_size": 4}},
        "figures": {"families": {
            "title": "Other families", "ablation": {"kind": "layer", "layers": [0, 2]},
            "series": [{"label": m, "model": m, "task": "kv"} for m in models],
            "panels": [{"metric": "acc_ce"}]}},
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "families")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    frame = pd.read_csv(tmp_path / "results/aggregate/families.csv")
    assert set(frame["series"]) == set(models)
    for model_id in models:
        resps = [
            pd.read_json(tmp_path / f"results/evaluate/{model_id}/kv/{unit}/samples.jsonl",
                         lines=True)["resps"].tolist()
            for unit in ("base", "layer0", "layer2")
        ]  # fmt: skip
        assert resps[0] != resps[1] and resps[0] != resps[2], f"{model_id}: a no-op ablation"
        job_logs = "".join(
            p.read_text() for p in (tmp_path / f"logs/evaluate/{model_id}").rglob("*.log")
        )
        assert "prefix sweep:" in job_logs, model_id


def bloom_config(tmp_path, embedded_dir, kind: str) -> dict:
    """A config sweeping ``kind`` on a tiny BLOOM checkpoint, whose attention and MLP modules
    add the residual themselves (so a hook zeroing their output zeroes the residual too)."""
    folder = tmp_path / "checkpoints" / "bloom"
    if not folder.exists():
        torch.manual_seed(0)
        config = transformers.BloomConfig(vocab_size=49152, hidden_size=64, n_layer=3, n_head=4)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(embedded_dir / name, folder / name)
    return {
        "data_dir": str(DATA_DIR),
        "models": {"bloom": {"source": "local", "path": "checkpoints/bloom", "num_layers": 3,
                             "num_heads": 4, "num_kv_heads": 4}},
        "tasks": {"kv": {"lm_eval_task": "kv_retrieval_short", "protocol": "loglikelihood",
                         "limit": 2, "batch_size": 2}},
        "figures": {"bloom_fig": {
            "title": "BLOOM", "ablation": {"kind": kind, "layers": [1]},
            "series": [{"label": "b", "model": "bloom", "task": "kv"}],
            "panels": [{"metric": "acc_ce"}]}},
    }  # fmt: skip


def test_a_kind_whose_invariant_fails_is_refused_before_any_job(tmp_path, embedded_dir):
    """BLOOM's sublayer hooks would zero the residual stream: the download refuses attn there
    in one line, and once the model is downloaded, so does every DAG build (a dry run too)."""
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump(bloom_config(tmp_path, embedded_dir, "attn"))
    )
    result = snakemake(tmp_path, "bloom_fig")
    assert result.returncode != 0
    line = ("figures.bloom_fig.panels[0].series.b: models.bloom (bloom) cannot be ablated by attn "
            "in the hook form of its backend: invariant 'attn and mlp removed == the block "
            "removed' fails at layer 0")  # fmt: skip
    assert line in (tmp_path / "logs/download/bloom.log").read_text()
    assert not (tmp_path / "logs/evaluate").exists()
    # A kind that holds there downloads it; asking for attn afterwards is refused at DAG build.
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump(bloom_config(tmp_path, embedded_dir, "layer"))
    )
    assert snakemake(tmp_path, "resources/models/bloom/download.json").returncode == 0
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump(bloom_config(tmp_path, embedded_dir, "attn"))
    )
    dry = snakemake(tmp_path, "bloom_fig", "-n")
    assert dry.returncode != 0
    assert f"config error: {line}" in dry.stdout + dry.stderr, dry.stdout[-2000:]


def test_an_edited_checkpoint_replans_its_evaluations_and_never_meets_an_old_baseline(
    tmp_path, embedded_dir
):
    """One tensor of a local checkpoint edited in place (same file size): the dry run plans its
    download and evaluations again, and a unit computed from the new weights is refused beside
    a baseline computed from the old ones."""
    from safetensors.torch import load_file, save_file

    from ablate.aggregate import ResultError, check_provenance

    config = bloom_config(tmp_path, embedded_dir, "layer")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert snakemake(tmp_path, "bloom_fig").returncode == 0
    assert "Nothing to be done" in snakemake(tmp_path, "bloom_fig", "-n").stdout
    weights = tmp_path / "checkpoints" / "bloom" / "model.safetensors"
    size = weights.stat().st_size
    tensors = load_file(weights)
    name = next(n for n in tensors if n.endswith("mlp.dense_4h_to_h.weight"))
    tensors[name] = tensors[name] * -1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size
    dry = snakemake(tmp_path, "bloom_fig", "-n")
    planned = dry.stdout + dry.stderr
    assert "download_model" in planned and "evaluate_bloom_kv" in planned, planned[-2000:]
    # A unit of the new weights beside the old baseline (as a run cut short would leave them).
    unit = tmp_path / "results/evaluate/bloom/kv/layer1/results.json"
    base = tmp_path / "results/evaluate/bloom/kv/base/results.json"
    old_base = json.loads(base.read_text())
    assert snakemake(tmp_path, "bloom_fig").returncode == 0
    new_unit = json.loads(unit.read_text())
    assert new_unit["provenance"]["model_files"] != old_base["provenance"]["model_files"]
    with pytest.raises(ResultError, match=r"provenance model_(revision|files) = .* differs from"):
        check_provenance(unit, new_unit, base, old_base)
