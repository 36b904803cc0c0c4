"""Bad configs fail before any job runs, with the key path and what is allowed."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import yaml

from ablate.config import ConfigError, check_config, figure_evaluations, figure_runs
from conftest import DATA_DIR, REPO, snakemake

PAPER = yaml.safe_load((REPO / "config.yaml").read_text())
DEMO = yaml.safe_load((REPO / "workflow/config/demo.yaml").read_text())


def dry_run(config: dict, tmp_path: Path, *targets: str) -> subprocess.CompletedProcess:
    """``snakemake -n`` in a working directory of its own (never the checkout's results)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config | {"data_dir": str(DATA_DIR)}))
    workdir = tmp_path / "run"
    workdir.mkdir()
    return snakemake(workdir, "-n", *targets, configfile=path)


def test_both_configs_pass_the_checks():
    check_config(PAPER)
    check_config(DEMO)
    # The paper's 22 figures and the sublayer figures beyond it in both configs; the demo adds its
    # generate-until figures on a task the embedded model can do (key-value copy).
    assert sorted(set(DEMO["figures"]) - set(PAPER["figures"])) == ["kv_copy", "kv_copy_heads"]
    assert set(PAPER["figures"]) <= set(DEMO["figures"])
    assert {f"fig{n}" for n in range(1, 23)} <= set(PAPER["figures"])


@pytest.mark.parametrize(
    ("figure", "evaluations"),
    [
        ("fig1", 3 * 33),  # 3 protocols x (32 layers + baseline)
        ("fig8", 33),  # 32 heads of layer 8 + baseline
        ("fig10", 2 * 37 + 33),  # Qwen3 thinking on/off (36 layers) + LLaMA-3.1 (32)
        # o_proj per layer on LLaMA and the whole-layer swap (one baseline), and layer pruning
        # of R1-Distill
        ("fig19", 3 * 32 + 2),
        ("fig22", 2 * 32 + 1),  # cumulative o_proj, cumulative whole layers (one baseline)
    ],
)
def test_paper_figures_plan_the_right_evaluations(figure, evaluations):
    assert len(figure_evaluations(PAPER, figure)) == evaluations


@pytest.mark.parametrize("figure", ["fig13", "fig16", "fig17", "fig18"])
def test_paper_head_figures_plot_kv_groups_per_query_head(figure):
    """The paper's "head h" zeroes h's KV group: 32 points from 8 group evaluations, beside 32
    single query heads (Qwen3-8B / R1-Distill: 4 query heads per KV head)."""
    runs = figure_runs(PAPER, figure)
    paper = [run for run in runs if run.kind == "paper_head"]
    single = [run for run in runs if run.kind == "head"]
    layer = paper[0].layer
    assert [run.head for run in paper] == [run.head for run in single] == list(range(32))
    assert [run.ablation for run in paper] == [f"kvgroup{layer}.{h // 4}" for h in range(32)]
    assert [run.ablation for run in single] == [f"head{layer}.{h}" for h in range(32)]
    assert len(figure_evaluations(PAPER, figure)) == 8 + 32 + 1


def test_paper_head_without_gqa_is_the_single_head():
    config = copy.deepcopy(PAPER)
    config["figures"]["fig8"]["ablation"]["kind"] = "paper_head"
    check_config(config)  # LLaMA-1: 32 KV heads, no kv_group, yet paper_head is allowed
    assert [run.ablation for run in figure_runs(config, "fig8")] == [
        f"head8.{h}" for h in range(32)
    ]


def test_o_proj_runs_compare_against_the_target_model():
    runs = figure_runs(PAPER, "fig21")
    assert {run.model for run in runs} == {"r1_distill_llama8b"}
    assert runs[5].ablation == "oprojcum5_from_llama31_8b"
    assert ("r1_distill_llama8b", "gsm8k_cot_reasoning", "base") in figure_evaluations(
        PAPER, "fig21"
    )


def broken(edit) -> dict:
    config = copy.deepcopy(DEMO)
    edit(config)
    return config


CASES = {
    "unknown model": (
        lambda c: c["figures"]["fig5"]["series"][0].update(model="gpt5"),
        r"figures.fig5.panels\[0\].series.SmolLM2-135M \(KV 3 pairs, paper 10\).model: unknown model 'gpt5' \(allowed: smollm2, smollm2_noisy_oproj\)",
    ),
    "unknown task": (
        lambda c: c["figures"]["fig5"]["series"][0].update(task="squad"),
        r"task: unknown task 'squad' \(allowed: mmlu, ",
    ),
    "layer out of range": (
        lambda c: c["figures"]["fig5"]["ablation"].update(layers=[30]),
        r"figures.fig5.panels\[0\].ablation.layers: layers \[30\] out of range \(allowed: 0..29\)",
    ),
    "head out of range": (
        lambda c: c["figures"]["fig13"]["ablation"].update(heads=[9]),
        r"ablation.heads: heads \[9\] out of range \(allowed: 0..8\)",
    ),
    "layer_set without an order": (
        lambda c: c["figures"]["fig5"].update(ablation={"kind": "layer_set", "removed": [1]}),
        r"figures.fig5.panels\[0\].ablation.order: required for kind layer_set \(order allowed: "
        r"block_influence, angular_block, random, explicit",
    ),
    "layer_set removing more layers than the model has": (
        lambda c: c["figures"]["fig5"].update(
            ablation={"kind": "layer_set", "order": "block_influence", "removed": [2, 31]}
        ),
        r"ablation.removed: \[31\] more layers than block_influence orders \(allowed: 1..30\)",
    ),
    "an explicit order without its layers": (
        lambda c: c["figures"]["fig5"].update(
            ablation={"kind": "layer_set", "order": "explicit", "removed": [1]}
        ),
        r"figures.fig5.panels\[0\].ablation.layers: required for order explicit",
    ),
    "layers under a proxy order": (
        lambda c: c["figures"]["fig5"].update(
            ablation={
                "kind": "layer_set",
                "order": "block_influence",
                "removed": [1],
                "layers": [3, 17],
            }
        ),
        r"ablation.layers: only order explicit takes layers \(block_influence picks from every",
    ),
    "layers under the random order": (
        lambda c: c["figures"]["fig5"].update(
            ablation={"kind": "layer_set", "order": "random", "removed": [1], "layers": [3]}
        ),
        r"ablation.layers: only order explicit takes layers \(random picks from every layer",
    ),
    "an order on a single-layer sweep": (
        lambda c: c["figures"]["fig5"]["ablation"].update(order="random"),
        r"figures.fig5.panels\[0\].ablation.order: only kind layer_set takes it",
    ),
    "thinking without a switch": (
        lambda c: c["tasks"]["gsm8k_8shot_chat"].update(enable_thinking=True),
        r"tasks.gsm8k_8shot_chat.enable_thinking: model smollm2 has no thinking switch",
    ),
    "o_proj source missing": (
        lambda c: c["figures"]["fig20"]["ablation"].update(source="nope"),
        r"ablation.source: 'nope' is not a model id",
    ),
    "a source that is the model itself": (
        lambda c: c["figures"]["fig20"]["ablation"].update(source="smollm2_noisy_oproj"),
        r"ablation.source: smollm2_noisy_oproj is model smollm2_noisy_oproj itself, so every oproj "
        r"unit would equal the "
        r"baseline \(Δ = 0 by construction",
    ),
    "o_proj shapes differ": (
        lambda c: c["models"]["smollm2_noisy_oproj"].update(num_layers=24),
        r"oproj needs equal shapes, but smollm2_noisy_oproj and smollm2 differ in num_layers",
    ),
    "kv_group without GQA": (
        lambda c: (
            c["models"]["smollm2"].update(num_kv_heads=9),
            c["figures"]["fig8"]["ablation"].update(kind="kv_group"),
        ),
        r"kind: kv_group needs grouped-query attention, but model smollm2 has 9 query and 9 KV heads",
    ),
    "vllm for log-likelihood": (
        lambda c: c["tasks"]["kv_retrieval"].update(backend="vllm"),
        r"tasks.kv_retrieval.backend: vllm does not run loglikelihood tasks, and task kv_retrieval is one \(allowed: hf\)",
    ),
    "figure named as a rule": (
        lambda c: c["figures"].update(all=c["figures"]["fig5"]),
        r"figures.all: a figure id names its target, and 'all' is a rule of the workflow "
        r"\(reserved: all, download_model, .*, evaluate_\*\)",
    ),
    "figure named as an evaluation rule": (
        lambda c: c["figures"].update(evaluate_x=c["figures"]["fig5"]),
        r"figures.evaluate_x: .* is a rule of the workflow",
    ),
    "flex attention on the CPU": (
        lambda c: c["models"]["smollm2"].update(attn_implementation="flex_attention"),
        r"models.smollm2.attn_implementation: flex_attention is compiled for the GPU; torch's "
        r"CPU build of it fails for some shapes \(on cpu allowed: sdpa, eager\)",
    ),
    "two backends for one task": (
        lambda c: c["figures"]["fig13"].update(backend="vllm"),
        r"figures.fig13.backend: vllm for model smollm2 on task gsm8k_1shot, but "
        r"tasks.gsm8k_1shot.backend gives it hf \(allowed: hf; or define a second task\)",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_cross_key_errors_name_the_key(case):
    edit, message = CASES[case]
    with pytest.raises(ConfigError, match=message):
        check_config(broken(edit))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["tasks"]["kv_retrieval"].update(limit=0),
            "config error: tasks.kv_retrieval.limit: 0 is less than the minimum of 1",
        ),
        (
            lambda c: c["tasks"]["kv_retrieval"].update(protocol="perplexity"),
            "tasks.kv_retrieval.protocol: 'perplexity' is not one of ['loglikelihood', "
            "'loglikelihood_rolling', 'generate_until'] (allowed: loglikelihood, "
            "loglikelihood_rolling, generate_until)",
        ),
        (
            lambda c: c["tasks"]["gsm8k_1shot"].update(backend="sglang"),
            "config error: tasks.gsm8k_1shot.backend: unknown backend 'sglang' (allowed: hf, vllm)",
        ),
        (
            lambda c: c["figures"]["fig5"]["ablation"].update(kind="neuron"),
            "(allowed: layer, attn, mlp, head, kv_group, paper_head, oproj, oproj_cumulative, "
            "layer_swap, layer_swap_cumulative, layer_set)",
        ),
        (
            lambda c: c["models"]["smollm2"].update(dtyp="bfloat16"),
            "models.smollm2: Additional properties are not allowed ('dtyp' was unexpected) "
            "(allowed: source, repo_id,",
        ),
    ],
)
@pytest.mark.slow  # a Snakemake dry run each
def test_schema_rejects_before_any_job(tmp_path, edit, message):
    result = dry_run(broken(edit), tmp_path, "fig5")
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "evaluate_smollm2" not in result.stdout


@pytest.mark.slow
def test_cross_key_error_reaches_the_user_in_one_line(tmp_path):
    result = dry_run(broken(CASES["layer out of range"][0]), tmp_path, "fig5")
    assert result.returncode != 0
    assert (
        "config error: figures.fig5.panels[0].ablation.layers: layers [30] out of range"
        in result.stdout + result.stderr
    )


@pytest.mark.slow
def test_demo_dry_run_plans_every_figure(tmp_path):
    figures = [f"fig{n}" for n in range(1, 23)]
    result = dry_run(DEMO, tmp_path, *figures)
    assert result.returncode == 0, result.stderr
    for figure in figures:
        assert f"rule {figure}:\n" in result.stdout


def test_backend_comes_from_the_figure_else_the_task():
    from ablate.config import evaluation_chunks

    config = broken(lambda c: c["figures"]["fig12"].update(backend="vllm"))
    config["tasks"]["mmlu_generative"]["backend"] = "vllm"
    backends = {(c.task, c.backend) for c in evaluation_chunks(config)}
    assert {("gsm8k_4shot", "vllm"), ("mmlu_generative", "vllm"), ("gsm8k_1shot", "hf")} <= backends
    assert ("kv_retrieval", "hf") in backends


def test_a_layer_swap_on_vllm_over_several_gpus_is_refused_in_one_line():
    """fig19's whole-layer swap series runs on vLLM; its check probes fused q/k/v and gate/up
    weights whole, so the model must not be sharded over GPUs."""
    on_vllm = broken(lambda c: c["tasks"]["gsm8k_cot"].update(backend="vllm"))
    check_config(on_vllm)
    on_vllm["models"]["smollm2"]["gpus"] = 2
    with pytest.raises(ConfigError) as error:
        check_config(on_vllm)
    assert str(error.value) == (
        "tasks.gsm8k_cot.backend: vllm applies layer_swap ablations exactly on one GPU only, "
        "and figure fig19 sweeps them on model smollm2 over 2 GPUs (allowed: hf; or "
        "models.smollm2.gpus and evaluation.vllm.engine_args.tensor_parallel_size at most 1)"
    )


def test_a_metric_the_paired_statistics_cannot_resample_is_refused():
    from ablate.config import check_task_metrics

    key = "figures.f.panels[0].metric"
    check_task_metrics([(key, "mcc")], ["mcc,none"], "x", "t", {"mcc": "mean"})
    with pytest.raises(ConfigError) as error:
        check_task_metrics([(key, "f1")], ["f1,none"], "x", "t", {"f1": "f1"})
    assert str(error.value) == (
        "figures.f.panels[0].metric: 'f1' of lm-eval task t is aggregated by f1, which the paired "
        "statistics cannot resample (allowed: mean, weighted_perplexity, bits_per_byte, perplexity)"
    )


def test_a_metric_with_a_digit_reaches_the_check_that_names_the_tasks_metrics():
    """f1 is a metric name: the schema takes it, and the task check says what the task
    produces (not a regex)."""
    from ablate.config import check_task_metrics, validate_config

    config = broken(lambda c: c["figures"]["fig5"]["panels"][0].update(metric="f1"))
    validate_config(config)
    with pytest.raises(ConfigError, match=r"'f1' is not produced by lm-eval task kv_retrieval_short "
                       r"of tasks.kv_retrieval \(allowed: 'acc', 'acc_ce'\)"):  # fmt: skip
        check_task_metrics([("figures.fig5.panels[0].metric", "f1")], ["acc,none", "acc_ce,none"],
                           "kv_retrieval", "kv_retrieval_short", {})  # fmt: skip


def test_a_source_whose_tensors_have_other_shapes_is_refused_from_the_config_files(tmp_path):
    """Declared shapes equal (layers, heads), real ones not: the two checkpoints' config.json
    files tell, before any job (before, the job failed on the first swapped tensor)."""
    import transformers

    from ablate.config.checks import block_shapes, check_source_shapes

    config = broken(lambda c: None)
    folders = {"smollm2": tmp_path / "a", "smollm2_noisy_oproj": tmp_path / "b"}
    tiny = dict(hidden_size=72, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                head_dim=8, vocab_size=100)  # fmt: skip
    transformers.LlamaConfig(**tiny, intermediate_size=96).save_pretrained(folders["smollm2"])
    transformers.LlamaConfig(**tiny, intermediate_size=96).save_pretrained(
        folders["smollm2_noisy_oproj"]
    )
    check_source_shapes(config, {model: block_shapes(f) for model, f in folders.items()})
    transformers.LlamaConfig(**tiny, intermediate_size=128).save_pretrained(
        folders["smollm2_noisy_oproj"]
    )
    with pytest.raises(ConfigError) as refused:
        check_source_shapes(config, {model: block_shapes(f) for model, f in folders.items()})
    # fig19's o_proj series passes (its o_proj shapes are equal); its whole-layer one is refused
    assert str(refused.value).startswith("figures.fig19.panels[0].series.SmolLM2 ← stand-in whole")
    assert str(refused.value).endswith(
        ".ablation.source: smollm2_noisy_oproj stores model.layers.0.mlp.gate_proj.weight as "
        "[128, 72], model smollm2 as [96, 72] (a swap needs equal tensor shapes)"
    )
