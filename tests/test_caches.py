"""Request caches answer only for the settings they were computed with, and one job writes a
chunk at a time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ablate import backends
from ablate.ablations import Ablation
from ablate.job import Job
from conftest import DATA_DIR, REPO

TASK = {"lm_eval_task": "kv_retrieval_short", "protocol": "loglikelihood", "limit": 3,
        "batch_size": 4}  # fmt: skip


def job(model_dir, cache_dir, **model) -> Job:
    spec = {"dtype": "float32", "device": "cpu"} | model
    return Job(model_dir, spec, TASK, DATA_DIR, cache_dir=cache_dir, prefix_reuse=False)


def test_each_setting_has_its_own_cache(embedded_dir, tmp_path):
    base = Ablation.parse("base")
    caches = {
        what: job(embedded_dir, tmp_path, **settings).request_cache(base)
        for what, settings in {
            "float32": {}, "again": {}, "bfloat16": {"dtype": "bfloat16"},
            "noise": {"o_proj_noise": 0.5}, "eager": {"attn_implementation": "eager"},
        }.items()
    }  # fmt: skip
    assert caches["float32"] == caches["again"]
    assert len({caches[k] for k in ("float32", "bfloat16", "noise", "eager")}) == 4
    record = json.loads(
        (tmp_path / caches["bfloat16"]).parent.joinpath("computed_with.json").read_text()
    )
    assert record["model"]["dtype"] == "bfloat16"


def test_a_cache_refuses_other_settings_copied_into_it(embedded_dir, tmp_path):
    folder = tmp_path / job(embedded_dir, tmp_path).request_cache(Ablation.parse("base"))
    record = folder.parent / "computed_with.json"
    settings = json.loads(record.read_text())
    record.write_text(json.dumps(settings | {"model": {"dtype": "bfloat16"}}))
    with pytest.raises(ValueError, match="computed with other settings than this job's"):
        job(embedded_dir, tmp_path).request_cache(Ablation.parse("base"))


@pytest.mark.slow
def test_a_dtype_change_never_replays_the_other_dtypes_answers(embedded_dir, tmp_path):
    """float32, then bfloat16, then float32 again under the same model id and cache folder:
    bfloat16 computes its own answers; float32's second run replays its first."""
    samples = {}
    for run, dtype in enumerate(("float32", "bfloat16", "float32")):
        out = tmp_path / f"run{run}"
        backends.run(
            job(embedded_dir, tmp_path / "cache", dtype=dtype), [(Ablation.parse("base"), out)]
        )
        lines = (out / "samples.jsonl").read_text().splitlines()
        samples[run] = [json.loads(line)["resps"] for line in lines]
    assert samples[0] != samples[1], "bfloat16 replayed float32's answers"
    assert samples[0] == samples[2]
    assert len(list((tmp_path / "cache").glob("*/computed_with.json"))) == 2


def test_a_second_writer_is_refused_in_one_line(tmp_path):
    lock = tmp_path / "chunk.log.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ablate.rule import sole_writer\n"
         f"with sole_writer({str(lock)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO / "scripts",
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run(
            [sys.executable, "-c", f"from ablate.rule import sole_writer\nwith sole_writer({str(lock)!r}): pass"],
            capture_output=True, text=True, cwd=REPO / "scripts",
        )  # fmt: skip
        assert second.returncode == 1
        assert second.stderr.count("\n") == 1
        assert f"this job is already running (pid {holder.pid} on " in second.stderr
    finally:
        holder.kill()
        holder.wait()
    # The lock died with its holder: the rerun goes ahead.
    done = subprocess.run(
        [sys.executable, "-c", f"from ablate.rule import sole_writer\nwith sole_writer({str(lock)!r}): print('ran')"],
        capture_output=True, text=True, cwd=REPO / "scripts",
    )  # fmt: skip
    assert done.stdout == "ran\n"
