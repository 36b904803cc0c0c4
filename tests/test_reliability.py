"""A killed evaluation leaves nothing a later run would trust, and its resubmission resumes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import DATA_DIR, SMOLLM2, snakemake, snakemake_command

pytestmark = pytest.mark.slow
CONFIG = {
    "data_dir": str(DATA_DIR),
    "models": {"smollm2": SMOLLM2},
    "tasks": {"kv": {"lm_eval_task": "kv_retrieval_short", "protocol": "loglikelihood",
                     "limit": 16, "batch_size": 4}},
    "figures": {"one": {"title": "one layer", "ablation": {"kind": "layer", "layers": [3]},
                        "series": [{"label": "s", "model": "smollm2", "task": "kv"}],
                        "panels": [{"metric": "acc"}]}},
}  # fmt: skip
TARGET = "results/evaluate/smollm2/kv/layer3/results.json"


def cached_requests(workdir: Path) -> int:
    total = 0
    for db in (workdir / "results/cache/smollm2/kv").rglob("layer3*.db"):
        with sqlite3.connect(db) as connection:
            total += connection.execute("SELECT COUNT(*) FROM unnamed").fetchone()[0]
    return total


def evaluation_process(parent: psutil.Process) -> psutil.Process | None:
    for child in parent.children(recursive=True):
        if any(".snakemake/scripts" in part for part in child.cmdline()):
            return child
    return None


def test_killed_job_is_not_trusted_and_resumes(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    # Download and baseline first, so the job we kill is the ablated evaluation.
    baseline = "results/evaluate/smollm2/kv/base/results.json"
    prepared = snakemake(tmp_path, baseline, cores=1)
    assert prepared.returncode == 0, prepared.stdout[-2000:]
    runner = subprocess.Popen(
        snakemake_command(tmp_path, TARGET, cores=1),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while cached_requests(tmp_path) < 4 and time.monotonic() < deadline:
        time.sleep(0.5)
    job = evaluation_process(psutil.Process(runner.pid))
    assert job is not None and cached_requests(tmp_path) >= 4, "the evaluation never got going"
    os.kill(job.pid, signal.SIGKILL)  # as a preempted or OOM-killed SLURM job dies
    runner.wait(timeout=120)
    assert runner.returncode != 0
    assert not (tmp_path / TARGET).exists()
    assert not (tmp_path / TARGET).with_name("samples.jsonl").exists()
    done_before_kill = cached_requests(tmp_path)

    rerun = snakemake(tmp_path, TARGET, cores=1)
    assert rerun.returncode == 0, rerun.stdout[-2000:]
    log = (tmp_path / "logs/evaluate/smollm2/kv/layer3.log").read_text()
    assert f"Cached requests: {done_before_kill}," in log
    assert (tmp_path / TARGET).exists()
