"""A config whose models are other families, as a user would write it: tiny random-weight
checkpoints on disk (`source: local`), each through the whole workflow. Each plans and runs its
ablations exactly (the exactness matrix proves the forms; here the workflow uses them), or the
download step says in one line which path it takes."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
import transformers
import yaml

from conftest import DATA_DIR, snakemake
from families import COMMON, build

pytestmark = pytest.mark.slow
# family -> config id; tiny models with the embedded tokenizer's vocabulary. StableLM is outside
# the sweep's exactness matrix: its log-likelihoods take lm-eval's HFLM path.
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
        log = (tmp_path / f"logs/download/{model_id}.log").read_text()
        job_logs = "".join(
            p.read_text() for p in (tmp_path / f"logs/evaluate/{model_id}").rglob("*.log")
        )
        if model_id == "stablelm":  # not in the sweep's matrix: said once, at download
            assert "models.stablelm: model type 'stablelm' is not in the sweep's exactness" in log
            assert "prefix sweep:" not in job_logs
        else:
            assert "exactness matrix" not in log
            assert "prefix sweep:" in job_logs
