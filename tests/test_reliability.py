"""A killed evaluation leaves nothing a later run would trust, and its resubmission resumes:
what a killed sweep computed, what truncated generations it counted, and its log says where it
was."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM, CachingLM

from ablate.ablations import Ablation
from ablate.backends.hf import evaluate
from ablate.job import Job
from ablate.sweep import PrefixSweep, ProgressFile, plan_batches
from ablate.unit_loop import BudgetTracking, Progress, cached_budget_hits
from conftest import DATA_DIR, SMOLLM2, snakemake, snakemake_command

# lm-eval's own path (no prefix sweep, which keeps its progress elsewhere: tested below), whose
# request cache grows per batch, so the kill lands mid-evaluation.
CONFIG = {
    "data_dir": str(DATA_DIR),
    "evaluation": {"prefix_reuse": False},
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


def kill_evaluation_when(
    workdir: Path, target: str, ready: Callable[[], bool], poll_s: float
) -> None:
    """Run Snakemake for ``target`` and SIGKILL its evaluation job once ``ready()`` holds, as a
    preempted or OOM-killed SLURM job dies; the run must then fail."""
    runner = subprocess.Popen(
        snakemake_command(workdir, target, cores=1),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while not ready() and time.monotonic() < deadline:
        time.sleep(poll_s)
    job = evaluation_process(psutil.Process(runner.pid))
    assert job is not None and ready(), "the evaluation never got going"
    os.kill(job.pid, signal.SIGKILL)
    runner.wait(timeout=120)
    assert runner.returncode != 0


@pytest.mark.slow
def test_killed_job_is_not_trusted_and_resumes(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    # Download and baseline first, so the job we kill is the ablated evaluation.
    baseline = "results/evaluate/smollm2/kv/base/results.json"
    prepared = snakemake(tmp_path, baseline, cores=1)
    assert prepared.returncode == 0, prepared.stdout[-2000:]
    kill_evaluation_when(tmp_path, TARGET, lambda: cached_requests(tmp_path) >= 4, poll_s=0.5)
    assert not (tmp_path / TARGET).exists()
    assert not (tmp_path / TARGET).with_name("samples.jsonl").exists()
    done_before_kill = cached_requests(tmp_path)

    rerun = snakemake(tmp_path, TARGET, cores=1)
    assert rerun.returncode == 0, rerun.stdout[-2000:]
    log = (tmp_path / "logs/evaluate/smollm2/kv/layer3.log").read_text()
    assert f"Cached requests: {done_before_kill}," in log
    assert (tmp_path / TARGET).exists()


# ------------------------------------------------- a killed log-likelihood sweep keeps its batches

SWEEP_TASK = {
    "lm_eval_task": "hellaswag_local",
    "protocol": "loglikelihood",
    "limit": 6,
    "batch_size": 2,
}  # 6 docs x 4 endings, 2 inputs a batch: 12 batches
SWEEP_CONFIG = {
    "data_dir": str(DATA_DIR),
    "evaluation": {"units_per_job": 3},
    "models": {"smollm2": SMOLLM2},
    "tasks": {"hs": SWEEP_TASK},
    "figures": {"three": {"title": "three layers", "ablation": {"kind": "layer", "layers": [3, 13, 29]},
                          "series": [{"label": "s", "model": "smollm2", "task": "hs"}],
                          "panels": [{"metric": "acc"}]}},
}  # fmt: skip
SWEEP_UNITS = ("layer3", "layer13", "layer29")
SWEEP_TARGET = "results/evaluate/smollm2/hs/layer3/results.json"
SWEEP_LOG = "logs/evaluate/smollm2/hs/layer3-layer29.log"
PROGRESS_S = "1"  # the heartbeat's interval in these jobs (default 30 s)


def unit_outputs(workdir: Path) -> dict[str, tuple[bytes, dict]]:
    """Per unit: samples.jsonl's bytes and results.json's metrics."""
    outputs = {}
    for unit in SWEEP_UNITS:
        folder = workdir / "results/evaluate/smollm2/hs" / unit
        record = json.loads((folder / "results.json").read_text())
        outputs[unit] = (folder / "samples.jsonl").read_bytes(), record["results"]
    return outputs


def sweep_counts(log: str) -> tuple[int, int]:
    """(batches restored from a progress file, batches computed) as the job logged them."""
    restored = re.findall(r"prefix sweep: restored (\d+) batches", log)
    computed = re.findall(r"prefix sweep: computed (\d+) batches", log)
    assert len(computed) == 1, log[-3000:]
    return int(restored[0]) if restored else 0, int(computed[0])


def progress_records(workdir: Path) -> int:
    files = list((workdir / "results/cache/smollm2/hs").glob("*/sweep_*.jsonl"))
    return sum(f.read_bytes().count(b"\n") for f in files)


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory) -> tuple[Path, dict, str, float]:
    """An uninterrupted run of the 3-unit HellaSwag chunk: its workdir, outputs, log, seconds."""
    workdir = tmp_path_factory.mktemp("sweep")
    (workdir / "config.yaml").write_text(yaml.safe_dump(SWEEP_CONFIG))
    # Model and task first: the timed job is the evaluation alone.
    prepared = snakemake(workdir, "resources/models/smollm2/download.json",
                         "resources/tasks/hs.json", cores=1)  # fmt: skip
    assert prepared.returncode == 0, prepared.stdout[-2000:]
    start = time.monotonic()
    result = snakemake(workdir, SWEEP_TARGET, cores=1, env={"ABLATE_PROGRESS_S": PROGRESS_S})
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-2000:]
    return workdir, unit_outputs(workdir), (workdir / SWEEP_LOG).read_text(), seconds


@pytest.mark.slow
def test_job_log_has_a_line_per_unit_and_progress(sweep_run):
    _, outputs, log, _ = sweep_run
    assert "\r" not in log  # no progress bars: plain lines for tail -f
    for unit in SWEEP_UNITS:
        score = outputs[unit][1]["hellaswag_local"]["acc,none"]
        line = re.search(
            rf"unit {unit} done \(\d/3\): 6 documents, [\d.]+ s, acc={score:.4g} ", log
        )
        assert line, unit
    # The heartbeat: the sweep's batches with an ETA while it runs, then units.
    assert re.search(r"progress: unit 1/3 layer3, 0 done, .*; sweep batches \d+/12, ETA \d+m", log)
    assert re.search(r"prefix sweep: 12 batches \(24 requests\) for 3 units", log)


@pytest.mark.slow
def test_killed_sweep_resumes_from_its_last_batch(sweep_run):
    workdir, uninterrupted, log, seconds = sweep_run
    assert sweep_counts(log) == (0, 12)
    # The same job again from scratch, killed after some batches.
    shutil.rmtree(workdir / "results/evaluate/smollm2/hs")
    shutil.rmtree(workdir / "results/cache/smollm2/hs")
    kill_evaluation_when(workdir, SWEEP_TARGET, lambda: progress_records(workdir) >= 3, poll_s=0.05)
    kept = progress_records(workdir)
    assert 3 <= kept < 12, kept  # killed mid-sweep
    # As if the kill had cut a record in half: the rerun ignores it.
    (progress,) = (workdir / "results/cache/smollm2/hs").glob("*/sweep_*.jsonl")
    with progress.open("ab") as handle:
        handle.write(b'0badc0de {"keys":["')

    start = time.monotonic()
    rerun = snakemake(workdir, SWEEP_TARGET, cores=1)
    rerun_seconds = time.monotonic() - start
    assert rerun.returncode == 0, rerun.stdout[-2000:]
    restored, computed = sweep_counts((workdir / SWEEP_LOG).read_text())
    # Only the batches the kill cut off are computed again, none twice.
    assert (restored, computed) == (kept, 12 - kept)
    assert unit_outputs(workdir) == uninterrupted  # samples byte-identical, same metrics
    assert not progress.exists()  # removed once every unit is written
    print(f"uninterrupted {seconds:.0f} s; killed after {kept}/12 batches, rerun computed "
          f"{computed} in {rerun_seconds:.0f} s")  # fmt: skip


# ------------------------------------------------------------------ crash-safe progress records


def test_progress_file_skips_torn_and_corrupt_records(tmp_path):
    path = tmp_path / "sweep.jsonl"
    progress = ProgressFile(path)
    for index in range(3):
        progress.append({"keys": [str(index)], "answers": {"layer3": [[-1.5 * index, True]]}})
    progress.close()
    lines = path.read_bytes().splitlines(keepends=True)
    corrupt = lines[1].replace(b"-1.5", b"-2.5")  # checksum no longer matches
    path.write_bytes(lines[0] + corrupt + lines[2] + b'0badc0de {"keys":["3"],"ans')  # torn
    records = ProgressFile(path).read()
    assert [r["keys"] for r in records] == [["0"], ["2"]]
    assert path.read_bytes().endswith(b"\n")  # the torn tail is cut: the next record is whole
    again = ProgressFile(path)
    again.append({"keys": ["4"], "answers": {}})
    again.close()
    assert [r["keys"] for r in ProgressFile(path).read()] == [["0"], ["2"], ["4"]]


def test_resumed_sweep_computes_only_the_missing_batches_bit_identically(
    tmp_path, model, tokenizer
):
    contexts = ["The capital of France is", "Water boils at", "A cat is a", "One, two,"]
    endings = [" Paris.", " one hundred degrees.", " small animal", " three"]
    requests = [
        ((ctx, end), tokenizer(ctx).input_ids, tokenizer(end, add_special_tokens=False).input_ids)
        for ctx in contexts
        for end in endings
    ]  # 16 distinct inputs, in batches of 2 options (a one-token ending is its own row)
    batches = len(plan_batches([(tuple(c), tuple(o)) for _, c, o in requests], 2, 2048))
    keys = [key for key, _, _ in requests]
    units = [Ablation.parse(a) for a in ("layer29", "layer3", "head13.2")]

    def sweep(path: Path) -> PrefixSweep:
        sweep = PrefixSweep(model, units, None, 2, 2048, progress_path=path, current=units[0])
        missing = sweep.missing(keys)
        sweep.compute([r for r in requests if r[0] in missing])
        return sweep

    full = sweep(tmp_path / "full.jsonl")
    assert (full.batches_restored, full.batches_computed) == (0, batches)
    lines = (tmp_path / "full.jsonl").read_bytes().splitlines(keepends=True)
    (tmp_path / "killed.jsonl").write_bytes(b"".join(lines[:3]))  # killed after 3 batches
    resumed = sweep(tmp_path / "killed.jsonl")
    assert (resumed.batches_restored, resumed.batches_computed) == (3, batches - 3)
    for unit in units:
        full.current = resumed.current = unit
        assert not resumed.missing(keys)
        assert resumed.answers(keys) == full.answers(keys)  # bit-identical, not just close


def test_progress_lines_have_an_eta(caplog):
    """On a clock the test sets: a step's ETA from its parts done, then from the last unit."""
    caplog.set_level(logging.INFO, logger="ablate")
    now = [100.0]
    progress = Progress(["layer3", "layer13"], interval_s=3600, clock=lambda: now[0])
    progress.step("sweep batches", 0, 4)
    now[0] += 10
    progress.step("sweep batches", 1, 4)
    assert progress.line() == (
        "progress: unit 1/2 layer3, 0 done, 0m10s elapsed; sweep batches 1/4, ETA 0m30s, "
        "then 1 more units"
    )
    now[0] += 35
    assert progress.unit_done("layer3", 6, {"acc": 0.5}) == 45
    assert "unit layer3 done (1/2): 6 documents, 45.0 s, acc=0.5" in caplog.text
    now[0] += 15
    assert progress.line() == (
        "progress: unit 2/2 layer13, 1 done, 1m00s elapsed; ETA 0m30s (last unit 45 s)"
    )
    now[0] += 60  # longer than the last unit took: no negative ETA
    assert progress.line().endswith("ETA 0m00s (last unit 45 s)")


# ---------------------------------------------- hit_budget of generations replayed from the cache

GENERATION = {"lm_eval_task": "gsm8k_local", "protocol": "generate_until", "num_fewshot": 1,
              "limit": 4, "batch_size": 4, "gen_kwargs": {"max_gen_toks": 24}}  # fmt: skip


@pytest.mark.slow
def test_replayed_generations_report_the_same_hit_budget(tmp_path, embedded_dir, tokenizer, caplog):
    job = Job(model_dir=embedded_dir, model=SMOLLM2 | {"dtype": "float32"}, task=GENERATION,
              data_dir=str(DATA_DIR), cache_dir=tmp_path / "cache")  # fmt: skip
    units = [(Ablation.parse(a), tmp_path / "out" / a) for a in ("base", "layer3")]

    def hit_budget() -> dict[str, int]:
        evaluate(job, units)
        return {
            ablation.id: json.loads((folder / "results.json").read_text())["results"][
                "gsm8k_local"
            ]["hit_budget,none"]
            for ablation, folder in units
        }

    live = hit_budget()
    assert 0 < sum(live.values()) < 8, live  # some generations hit the budget, some stopped
    budget = GENERATION["gen_kwargs"]["max_gen_toks"]
    for ablation, folder in units:  # a response still `budget` tokens long was cut off
        lines = (folder / "samples.jsonl").read_text().splitlines()
        responses = [s["resps"][0][0] for s in map(json.loads, lines)
                     if s["filter"] == "strict-match"]  # fmt: skip
        lengths = [len(tokenizer(r, add_special_tokens=False).input_ids) for r in responses]
        assert live[ablation.id] == sum(length == budget for length in lengths), ablation.id
    shutil.rmtree(tmp_path / "out")  # as after a kill: results gone, the request cache kept
    caplog.clear()
    caplog.set_level(logging.INFO, logger="lm_eval")
    assert hit_budget() == live
    assert caplog.text.count("Cached requests: 4, Requests remaining: 0") == 2  # all replayed


class RewritingGenerator(LM):
    """Generates "x" * n for a context of n characters within a budget of 3 tokens, and caches
    each generation under rewritten settings, as lm-eval's vLLM model does."""

    def generate_until(self, requests, disable_tqdm=False):
        contexts = [r.args[0] for r in requests]
        self.record_budget_hits([len(context) > 3 for context in contexts])
        for context in contexts:
            settings = requests[0].args[1] | {"max_gen_toks": 3, "until": ["\n"]}
            self.cache_hook.add_partial("generate_until", (context, settings), "x" * len(context))
        return ["x" * len(context) for context in contexts]

    def loglikelihood(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError


class TrackedGenerator(BudgetTracking, RewritingGenerator):
    pass


def test_budget_flags_are_found_where_a_backend_caches_under_rewritten_settings(tmp_path):
    lm = TrackedGenerator()
    cache = str(tmp_path / "unit")
    cached = CachingLM(lm, f"{cache}_rank0.db")
    requests = [
        Instance("generate_until", {}, (context, {"do_sample": False}), 0)
        for context in ("ab", "abcd", "abcdef")
    ]
    assert cached.generate_until(requests) == ["xx", "xxxx", "xxxxxx"]
    cached.dbdict.commit()
    samples = [{"task": "t", "doc_id": i, "arguments": [r.args]} for i, r in enumerate(requests)]
    assert cached_budget_hits(lm, cache, samples) == (2, 0)
