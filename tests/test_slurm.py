"""A small demo figure submitted through profiles/slurm to a real (local, single-node) SLURM.

CI starts the cluster with .ci/slurm-up.sh; elsewhere the test is skipped when SLURM is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import DATA_DIR, REPO

JOBCOMP = Path("/var/log/slurm/jobcomp.log")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("sbatch") is None and not os.environ.get("CI"),
        reason="no SLURM here (CI starts one with .ci/slurm-up.sh)",
    ),
]


def test_figure_through_slurm(tmp_path):
    config = yaml.safe_load((REPO / "tests/config/tiny.yaml").read_text())
    config["data_dir"] = str(DATA_DIR)
    config["models"]["smollm2"]["gpus"] = 1  # exercise --gpus on the fake gres
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    completed_before = JOBCOMP.read_text().count("JobState=COMPLETED") if JOBCOMP.exists() else 0
    command = [
        sys.executable, "-m", "snakemake", "tiny_layers",
        "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
        "--profile", str(REPO / "profiles/slurm"),
        # This cluster has no slurmdbd (sacct) and 2 CPUs: the documented overrides.
        "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
        "--default-resources", "slurm_partition=gpu", "cpus_per_task=1", "mem_mb=1000", "runtime=10",
        "--latency-wait", "5", "--jobs", "2",
        "--configfile", str(tmp_path / "config.yaml"),
    ]  # fmt: skip
    # -k: Snakemake ignores SIGTERM while it waits for the scheduler.
    result = subprocess.run(
        ["timeout", "-k", "10", "900", *command], capture_output=True, text=True
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    frame = pd.read_csv(tmp_path / "results/aggregate/tiny_layers.csv")
    assert len(frame) == 6 and frame["score"].between(0, 1).all()
    assert (tmp_path / "results/figures/tiny_layers.png").stat().st_size > 10_000
    # Two evaluation jobs ran on SLURM, each given a GPU: the baseline, and the chunk of the three
    # layers (rule evaluate_smollm2_kv_layer0); downloads, aggregation, claims and plots stayed
    # on the submit host.
    listing = subprocess.run(
        ["squeue", "--states=all", "-h", "-o", "%i|%T|%k|%Z"], capture_output=True, text=True
    ).stdout
    jobs = [line.split("|") for line in listing.splitlines() if line.endswith(f"|{tmp_path}")]
    assert sorted(comment for _, _, comment, _ in jobs) == [
        "rule_evaluate_smollm2_kv_base",
        "rule_evaluate_smollm2_kv_layer0",
    ]
    assert all(state == "COMPLETED" for _, state, _, _ in jobs)
    for job_id, *_ in jobs:
        details = subprocess.run(
            ["scontrol", "show", "job", job_id], capture_output=True, text=True
        )
        assert "TresPerJob=gres:gpu:1" in details.stdout
    completed = JOBCOMP.read_text().count("JobState=COMPLETED") - completed_before
    assert completed == 2
