"""The planner counts exactly the jobs Snakemake would run, and costs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ablate.plan import PRIOR_RATE, calibrated_rates, plan, planned_evaluations, total_row

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "config.yaml"
DEMO = REPO / "workflow/config/demo.yaml"


def test_paper_plan_counts_every_evaluation(tmp_path):
    rows = plan(["fig11", "fig13"], PAPER, tmp_path)
    jobs = {row["figure"]: row["jobs"] for row in rows}
    assert jobs == {"fig11": 37, "fig13": 33}  # 36 layers / 32 heads of layer 35, + baseline
    assert all(row["gpus_per_job"] == 1 and row["rate"] == "prior" for row in rows)
    total = total_row(rows)
    assert total["jobs"] == 37 + 33 - 1  # the two figures share Qwen3's GSM8K 1-shot baseline
    assert total["gpu_hours"] == pytest.approx(
        sum(r["gpu_hours"] for r in rows) * 69 / 70, rel=0.01
    )


def test_finished_evaluations_are_excluded(tmp_path):
    before = planned_evaluations(["fig8"], DEMO, tmp_path)
    assert len(before) == 10  # 9 heads + baseline
    # Inputs first, then the result: an up-to-date finished evaluation.
    for path in ("resources/models/smollm2/download.json", "resources/tasks/kv_retrieval.json",
                 "results/evaluate/smollm2/kv_retrieval/head8.3/results.json",
                 "results/evaluate/smollm2/kv_retrieval/head8.3/samples.jsonl"):  # fmt: skip
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(json.dumps({}))
    after = planned_evaluations(["fig8"], DEMO, tmp_path)
    assert len(after) == 9
    assert all(job.ablation != "head8.3" for job in after)


def test_rates_are_calibrated_from_benchmarks(tmp_path):
    import yaml

    config = yaml.safe_load(DEMO.read_text())
    tsv = tmp_path / "smollm2" / "kv_retrieval" / "layer3.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text("s\th:m:s\n25.0\t0:00:25\n")
    rates = calibrated_rates(config, tmp_path)
    assert set(rates) == {("cpu", "prefill")}
    # 6 docs x 400 tokens x 4 options x 0.135 B params in 25 s minus 5 s of start-up
    assert rates[("cpu", "prefill")] == pytest.approx(20.0 / (6 * 400 * 4 * 0.135))
    assert rates[("cpu", "prefill")] != PRIOR_RATE[("cpu", "prefill")]
