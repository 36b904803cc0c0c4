"""A shared-prefix sweep scores exactly like one plain lm-eval evaluation per ablation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ablate.ablations import Ablation
from ablate.backends.hf import evaluate
from ablate.job import Job
from conftest import DATA_DIR, SMOLLM2

pytestmark = pytest.mark.slow  # full lm-eval evaluations, twice per ablation
MODEL = SMOLLM2 | {"dtype": "float32", "device": "cpu"}
# Every kind of ablation, in an order that is not sorted by first changed layer.
ABLATIONS = ["base", "layer13", "head29.4", "layer0", "kvgroup7.1", "oproj5_from_noisy",
             "oprojcum3_from_noisy", "layer29", "attn6", "mlp2"]  # fmt: skip


def run(tmp_path: Path, embedded_dir, perturbed_dir, task: dict, ids, reuse: bool) -> dict:
    job = Job(
        model_dir=embedded_dir, model=MODEL, task=task, data_dir=str(DATA_DIR),
        source_dir=perturbed_dir, prefix_reuse=reuse,
    )  # fmt: skip
    out = tmp_path / ("sweep" if reuse else "plain")
    # Without reuse each ablation is applied to the whole model around its own lm-eval run.
    evaluate(job, [(Ablation.parse(a), out / a) for a in ids])
    return {
        a: (
            json.loads((out / a / "results.json").read_text())["results"],
            [json.loads(line) for line in (out / a / "samples.jsonl").read_text().splitlines()],
        )
        for a in ids
    }


@pytest.mark.parametrize(
    "task",
    [
        {
            "lm_eval_task": "kv_retrieval_short",
            "protocol": "loglikelihood",
            "limit": 4,
            "batch_size": 5,
        },
        # Multi-token continuations, and batches that mix lengths.
        {
            "lm_eval_task": "hellaswag_local",
            "protocol": "loglikelihood",
            "limit": 3,
            "batch_size": 5,
        },
    ],
    ids=["kv_retrieval", "hellaswag"],
)
def test_sweep_equals_plain_evaluation(tmp_path, embedded_dir, perturbed_dir, task):
    sweep = run(tmp_path, embedded_dir, perturbed_dir, task, ABLATIONS, reuse=True)
    plain = run(tmp_path, embedded_dir, perturbed_dir, task, ABLATIONS, reuse=False)
    distinct = set()
    for ablation in ABLATIONS:
        (sweep_results, sweep_samples), (plain_results, plain_samples) = (
            sweep[ablation],
            plain[ablation],
        )
        for name, metrics in plain_results.items():
            for key in ("acc,none", "acc_norm,none", "acc_ce,none"):
                if key in metrics:
                    assert sweep_results[name][key] == metrics[key], (ablation, name, key)
        assert len(sweep_samples) == len(plain_samples) > 0
        lls = []
        for fast, slow in zip(sweep_samples, plain_samples, strict=True):
            assert (fast["doc_id"], fast["acc"], fast["acc_ce"]) == (
                slow["doc_id"],
                slow["acc"],
                slow["acc_ce"],
            )
            for (fast_ll, fast_greedy), (slow_ll, slow_greedy) in zip(
                fast["filtered_resps"], slow["filtered_resps"], strict=True
            ):
                assert fast_ll == pytest.approx(slow_ll, abs=1e-4)
                assert fast_greedy == slow_greedy
                lls.append(round(slow_ll, 3))
        distinct.add(tuple(lls))
    assert len(distinct) == len(ABLATIONS), "some ablations scored identically: nothing was ablated"
