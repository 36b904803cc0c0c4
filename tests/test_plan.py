"""The planner counts exactly the jobs Snakemake would run, and costs them."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from ablate.ablations import Ablation
from ablate.config import load_config, task_settings
from ablate.cost import (
    DOCUMENT_TOKENS,
    TaskCost,
    calibrated_rates,
    chunk_seconds,
    job_tokens,
    prior_rates,
)
from ablate.plan import plan, planned_chunks, total_line, total_row
from ablate.request_counter import pair_strings
from ablate.tokens import TaskTokens, offline_twin, vocabulary
from conftest import DATA_DIR, REPO, SMOLLM2, snakemake

PAPER = load_config(REPO / "config.yaml")
DEMO = load_config(REPO / "workflow/config/demo.yaml")


def test_paper_plan_counts_every_evaluation(tmp_path):
    rows = plan(["fig11", "fig13"], PAPER, tmp_path, stand_in=False)
    # 36 layers; the 32 single heads of layer 35 and its 8 KV groups (the paper's head pruning),
    # in jobs of 8 units, plus the baseline's job
    jobs = {row["figure"]: (row["jobs"], row["units"]) for row in rows}
    assert jobs == {"fig11": (5 + 1, 36 + 1), "fig13": (4 + 1 + 1, 32 + 8 + 1)}
    assert all(row["gpus_per_job"] == 1 and row["rate"] == "prior" for row in rows)
    total = total_row(rows)
    # The two figures share Qwen3's GSM8K 1-shot baseline job: counted once.
    assert (total["jobs"], total["units"]) == (11, 77)
    config = copy.deepcopy(PAPER)
    task = config["tasks"]["gsm8k_1shot"]
    base = chunk_seconds(
        config["models"]["qwen3_8b"], task, ("base",), prior_rates(), backend=task["backend"]
    )
    assert total["gpu_hours"] == pytest.approx(
        sum(r["gpu_hours"] for r in rows) - base / 3600, rel=0.01
    )


def test_finished_evaluations_are_excluded(tmp_path):
    before = planned_chunks(["fig8"], DEMO, tmp_path)
    assert sorted(len(chunk.ablations) for chunk in before) == [1, 1, 8]  # base; heads 0-7; 8
    # Inputs first, then the result: an up-to-date finished evaluation.
    for path in ("resources/models/smollm2/download.json", "resources/tasks/kv_retrieval.json",
                 "results/evaluate/smollm2/kv_retrieval/head8.8/results.json",
                 "results/evaluate/smollm2/kv_retrieval/head8.8/samples.jsonl"):  # fmt: skip
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(json.dumps({}))
    after = planned_chunks(["fig8"], DEMO, tmp_path)
    assert sorted(after, key=str) == sorted((c for c in before if "head8.8" not in c.ids), key=str)


def test_rates_are_calibrated_from_benchmarks(tmp_path):
    config = copy.deepcopy(DEMO)
    config["tasks"]["kv_retrieval"]["limit"] = 6
    tsv = tmp_path / "benchmarks/evaluate/smollm2/kv_retrieval/layer0-layer7.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text("s\th:m:s\n25.0\t0:00:25\n")
    rates = calibrated_rates(config, tmp_path)
    assert set(rates) == {("cpu", "hf", "prefill")}
    # Layers 0-7 of 30 with prefix reuse: the unablated model up to layer 7 once, then layers
    # l+1..29 for each skipped layer l: (7 + 29+28+...+22) / 30 = 211/30 full passes over 6 docs
    # x 400 tokens x 4 options, 0.135 B params, in 25 s minus 5 s of start-up.
    passes = 211 / 30
    assert rates[("cpu", "hf", "prefill")] == pytest.approx(20.0 / (passes * 6 * 400 * 4 * 0.135))
    assert rates[("cpu", "hf", "prefill")] != prior_rates()[("cpu", "hf", "prefill")]


def test_vllm_decode_is_calibrated_net_of_its_own_prefill(tmp_path):
    config = copy.deepcopy(DEMO)
    config["tasks"]["gsm8k_1shot"]["backend"] = "vllm"
    for chunk, seconds in (
        ("kv_retrieval/layer0-layer7", 25.0),
        ("gsm8k_1shot/layer0-layer7", 100.0),
    ):
        tsv = tmp_path / "benchmarks/evaluate/smollm2" / f"{chunk}.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        tsv.write_text(f"s\th:m:s\n{seconds}\t0:01:40\n")
    rates = calibrated_rates(config, tmp_path)
    assert set(rates) == {("cpu", "hf", "prefill"), ("cpu", "vllm", "decode")}
    # 8 units x 4 docs x 400 prompt tokens at vllm's prefill prior (not hf's calibrated rate),
    # then 8 x 4 docs x 48 generated tokens, in 100 s minus 35 s of engine start-up.
    prefill = 8 * 4 * 400 * prior_rates()[("cpu", "vllm", "prefill")] * 0.135
    assert rates[("cpu", "vllm", "decode")] == pytest.approx(
        (65.0 - prefill) / 0.135 / (8 * 4 * 48)
    )


def test_plan_costs_both_backends(tmp_path):
    """A generate-until figure on vllm (the paper config's): its row says what it costs there and
    on hf, and the hf cost is what the same figure plans on hf (one key away)."""
    config = copy.deepcopy(PAPER)
    config["tasks"]["gsm8k_1shot"]["backend"] = "hf"
    [on_hf] = plan(["fig11"], config, tmp_path, stand_in=False)
    [on_vllm] = plan(["fig11"], PAPER, tmp_path, stand_in=False)
    assert (on_hf["backend"], on_vllm["backend"]) == ("hf", "vllm")
    assert on_vllm["gpu_hours_other_backend"] == pytest.approx(on_hf["gpu_hours"], abs=0.01)
    assert on_hf["gpu_hours_other_backend"] == pytest.approx(on_vllm["gpu_hours"], abs=0.01)
    assert on_vllm["gpu_hours"] < on_hf["gpu_hours"]
    [loglikelihood] = plan(["fig5"], PAPER, tmp_path, stand_in=False)
    assert loglikelihood["gpu_hours_other_backend"] is None


# Two figures on different tasks (HellaSwag: four multi-token endings on a shared context;
# MMLU: one-token answer letters), each a baseline job and a chunk of layers.
PREDICTION = {
    "evaluation": {"units_per_job": 4},
    "models": {"smollm2": SMOLLM2},
    "tasks": {
        "hellaswag": {"lm_eval_task": "hellaswag_local", "protocol": "loglikelihood", "limit": 24},
        "mmlu": {"lm_eval_task": "mmlu_local", "protocol": "loglikelihood", "limit": 40},
    },
    "figures": {
        "calibration": {"title": "calibration", "ablation": {"kind": "layer", "layers": [0, 10, 20, 29]},
                        "series": [{"label": "SmolLM2", "model": "smollm2", "task": "hellaswag"}],
                        "panels": [{"metric": "acc"}]},
        "prediction": {"title": "prediction", "ablation": {"kind": "layer", "layers": [5, 15, 25]},
                       "series": [{"label": "SmolLM2", "model": "smollm2", "task": "mmlu"}],
                       "panels": [{"metric": "acc"}]},
    },
}  # fmt: skip


@pytest.mark.bench  # a timing ratio: `make bench` runs it, `make test` does not
def test_calibrated_on_one_figure_the_planner_predicts_another(tmp_path):
    config = copy.deepcopy(PREDICTION) | {"data_dir": str(DATA_DIR)}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    config = load_config(tmp_path / "config.yaml")
    # The calibration figure runs; the other's task is prefetched (its tokens can be counted).
    result = snakemake(tmp_path, "calibration", "resources/tasks/mmlu.json")
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = plan(["prediction"], config, tmp_path)
    assert (row["rate"], row["tokens"], row["jobs"]) == ("calibrated", "counted", 2)
    [counted_file] = (tmp_path / "resources/tokens/smollm2").glob("mmlu-*.json")
    counted = json.loads(counted_file.read_text())
    assert counted["documents"] == 40 and counted["shared"] == counted["sequences"]  # letters
    result = snakemake(tmp_path, "prediction")
    assert result.returncode == 0, result.stderr[-3000:]
    measured = {
        chunk: float(
            (tmp_path / f"benchmarks/evaluate/smollm2/mmlu/{chunk.label}.tsv")
            .read_text()
            .splitlines()[1]
            .split("\t")[0]
        )
        for chunk in row["_jobs"]
    }
    predicted = sum(row["_jobs"].values())
    print(f"predicted {predicted:.0f} s, measured {sum(measured.values()):.0f} s: {measured}")
    assert 1 / 1.5 <= predicted / sum(measured.values()) <= 1.5


def test_plan_follows_the_sweep_path_each_model_takes(tmp_path):
    """Flash attention shares no context among options, and a model whose sweep the download
    step turned off runs one evaluation per unit: both cost more, and the plan says so."""
    model, task = PAPER["models"]["llama31_8b"], PAPER["tasks"]["hellaswag"]
    cost = TaskCost(shared=100.0, sequences=400.0, prompt=0.0, generated=0.0, tokens="counted")
    units = tuple(Ablation.parse(f"layer{i}") for i in range(8))
    sdpa = chunk_seconds(model, task, units, prior_rates(), cost=cost)
    flash = chunk_seconds(model | {"attn_implementation": "flash_attention_2"}, task, units,
                          prior_rates(), cost=cost)  # fmt: skip
    assert flash > sdpa
    flex = chunk_seconds(model | {"attn_implementation": "flex_attention"}, task, units,
                         prior_rates(), cost=cost)  # fmt: skip
    assert flex == sdpa  # block masks share contexts as sdpa's 4D masks do

    def hours() -> float:
        return total_row(plan(["fig3"], PAPER, tmp_path, stand_in=False))["gpu_hours"]

    swept = hours()
    record = tmp_path / "resources/models/llama31_8b/download.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"commit": "x", "sweep_off": "model type 'x' is not ..."}))
    assert hours() > 1.5 * swept


def test_every_paper_task_and_model_has_a_stand_in():
    """A dry run plans the paper config from counted tokens: each task has an offline twin of
    its documents (but WikiText-2, of which ../shared/data holds no copy: planned from its known
    size, ablate.cost.DOCUMENT_TOKENS), each model a measured vocabulary factor."""
    for task_id, task in PAPER["tasks"].items():
        twin = offline_twin(task_settings(PAPER, task_id))
        if task["lm_eval_task"] in DOCUMENT_TOKENS:
            assert twin is None, task_id
            continue
        assert twin is not None and twin.get("local", True), task_id
    for model_id, model in PAPER["models"].items():
        assert vocabulary(model) is not None, model_id


def paper_in(workdir):
    config = copy.deepcopy(PAPER) | {"data_dir": str(DATA_DIR)}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return load_config(workdir / "config.yaml")


def test_stand_in_tokens_replace_the_prior(tmp_path):
    """OpenBookQA on Llama-3.1 (no model, no hub data here): the offline twin counted with
    SmolLM2's tokenizer, scaled by Llama-3's measured factor; flash attention (no context
    sharing) and a gpu-check calibration each change the plan."""
    config = paper_in(tmp_path)
    [row] = [r for r in plan(["fig6"], config, tmp_path) if r["task"] == "openbookqa_closed"]
    assert row["tokens"] == "stand-in SmolLM2 x1.03 (Llama-3 128k)"
    [counted_file] = (tmp_path / "resources/tokens/_stand-in").glob("openbookqa_closed-*.json")
    counted = json.loads(counted_file.read_text())
    assert counted["documents"] == 500 and counted["shared"] < counted["sequences"]
    [prior] = [r for r in plan(["fig6"], config, tmp_path, stand_in=False)
               if r["task"] == "openbookqa_closed"]  # fmt: skip
    # 500 questions of ~30 tokens, not 400-token priors: an order of magnitude less.
    assert row["gpu_hours"] < prior["gpu_hours"] / 3
    config["models"]["llama31_8b"]["attn_implementation"] = "flash_attention_2"
    [flash] = [r for r in plan(["fig6"], config, tmp_path) if r["task"] == "openbookqa_closed"]
    assert sum(flash["_jobs"].values()) > sum(row["_jobs"].values())  # job start-up dominates
    check = tmp_path / "benchmarks/gpu_check.json"
    check.parent.mkdir()
    slower = 10 * prior_rates()[("cuda", "hf", "prefill")]
    check.write_text(json.dumps({"tiny": False, "rates": {"cuda/hf/prefill": slower}}))
    [measured] = [r for r in plan(["fig6"], config, tmp_path) if r["task"] == "openbookqa_closed"]
    assert measured["rate"] == "gpu-check"
    assert sum(measured["_jobs"].values()) > sum(flash["_jobs"].values())


def test_vllm_plan_charges_a_shared_few_shot_prefix_once_per_batch():
    counts = TaskTokens(documents=64, shared=0, sequences=0, prompt=64 * 1000,
                        prompt_common=900, budget=64 * 256, settings={})  # fmt: skip
    task = PAPER["tasks"]["gsm8k_8shot"]  # batch size 32: two batches
    cost = TaskCost.of(task, counts)
    assert cost.prompt_cached == 900 * (64 - 2)
    model, units = PAPER["models"]["llama31_8b"], (Ablation.parse("layer3"),)
    assert job_tokens(model, task, units, cost, True, "vllm")[0] == 64 * 1000 - 900 * 62
    assert job_tokens(model, task, units, cost, True, "hf")[0] == 64 * 1000


def test_dry_run_ends_with_the_planners_gpu_hours(tmp_path):
    config = paper_in(tmp_path)
    result = snakemake(tmp_path, "fig6", "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    total = total_row(plan(["fig6"], config, tmp_path))
    line = result.stderr.strip().splitlines()[-1]
    assert line == (f"GPU-hour plan: {total_line(total)} (tokens: stand-in; rates: prior)")
    assert "10 evaluation jobs (66 units)" in line


def test_configs_sharing_a_task_id_keep_both_counts(tmp_path):
    """The paper's OpenBookQA (500 documents) and a 16-document one under the same task id:
    planning one, then the other, then the first again counts each once; neither overwrites
    the other (before, the demo's count replaced the paper's)."""
    config = paper_in(tmp_path)
    task = config["tasks"]["openbookqa_closed"]
    small = copy.deepcopy(config)
    small["tasks"]["openbookqa_closed"] = task | {"limit": 16}
    folder = tmp_path / "resources/tokens/_stand-in"

    def documents() -> list[int]:
        return sorted(
            json.loads(p.read_text())["documents"] for p in folder.glob("openbookqa_closed-*")
        )

    rows = {}
    for name, cfg in (("paper", config), ("small", small), ("paper again", config)):
        [rows[name]] = [
            r for r in plan(["fig6"], cfg, tmp_path) if r["task"] == "openbookqa_closed"
        ]
        if name == "small":
            stamps = {p: p.stat().st_mtime_ns for p in folder.glob("openbookqa_closed-*")}
    assert documents() == [16, 500]
    assert {
        p: p.stat().st_mtime_ns for p in folder.glob("openbookqa_closed-*")
    } == stamps  # no recount
    assert rows["paper again"]["gpu_hours"] == rows["paper"]["gpu_hours"]
    assert rows["small"]["gpu_hours"] < rows["paper"]["gpu_hours"]


def test_request_strings_are_encoded_in_one_batch_as_lm_eval_encodes_them(embedded_dir):
    """Every string lm-eval's TemplateLM encodes for a request (trailing spaces moved to the
    continuation, an empty context) is in the batch encoded first: with the tokenizer gone
    afterwards, lm-eval's own encoding still finds each one, with the same token ids."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from ablate.request_counter import RequestCounter

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    args = [("Question: 2+2? Answer: ", "4"), ("Context", " ends"), ("", "alone"), ("  ", "x")]
    requests = [SimpleNamespace(args=a) for a in args]
    reference = RequestCounter(tokenizer, {}, 2048)
    expected = [reference._encode_pair(*a) if a[0] else None for a in args]
    counter = RequestCounter(tokenizer, {}, 2048)
    counter.encode_all([s for a in args for s in pair_strings(*a)])
    counter.tokenizer = SimpleNamespace(eos_token_id=tokenizer.eos_token_id)  # not callable
    counter.loglikelihood(requests)
    assert [scored for scored, e in zip(counter.scored, expected, strict=True) if e] == [
        (tuple(e[0]), tuple(e[1])) for e in expected if e
    ]
