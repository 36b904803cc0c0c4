import atexit
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

# ablate is on sys.path: the Snakefile put it there to check the config files.
from ablate.backends import BACKENDS
from ablate.claims import claim_figures, parse_claims
from ablate.config import (
    ConfigError,
    check_model_proofs,
    check_task_records,
    evaluation_chunks,
    figure_evaluations,
    panel_series,
    task_settings,
    validate_config,
)
from ablate.cost import TaskCost, chunk_seconds, prior_rates
from ablate.download import local_checkpoint_files
from ablate.job import evaluated_model
from ablate.paths import (
    BENCHMARK,
    CLAIMS_CSV,
    EVALUATION_FILE,
    EVALUATION_LOG,
    EVALUATIONS,
    FIGURE_CSV,
    FIGURE_CAPTION,
    FIGURE_PDF,
    FIGURE_PNG,
    FIGURE_PROVENANCE,
    MODEL_RECORD,
    PROXIES,
    BLOCK_DISTANCES,
    REQUEST_CACHES,
    TASK_RECORD,
)
from ablate.tokens import model_counts_path, read_task_tokens

# workflow/schemas/config.schema.yaml, then the cross-key checks: one line naming the key before
# any job; the schema's defaults are filled in. Then against what prefetch_task recorded: a task
# id whose results have other settings, a metric the built task does not produce; and against
# what download_model proved: an ablation kind whose invariants fail on the model.
try:
    validate_config(config)
    check_task_records(config)
    check_model_proofs(config)
except ConfigError as error:
    raise WorkflowError(f"config error: {error}") from None


def print_dry_run_plan():
    """What the evaluation jobs of this dry run will cost: the planner's total over exactly the
    jobs Snakemake listed. Snakemake runs no hook in a dry run, hence at exit, and the planner
    in its own process (its task loading needs threads, which are shut down by then)."""
    if not workflow.dryrun or workflow.dag is None:  # dag: the run got that far
        return
    jobs = [job.rule.name for job in workflow.dag.jobs if workflow.dag.needrun(job)]
    with tempfile.NamedTemporaryFile("w", suffix=".json") as planned:
        json.dump({"config": config, "jobs": jobs}, planned, default=str)
        planned.flush()
        command = [sys.executable, "-m", "ablate.plan", "--dry-run", planned.name]
        result = subprocess.run(command, capture_output=True, text=True)
    # lm-eval's task-loading chatter goes; a failure's last line stays.
    lines = (result.stdout or result.stderr).strip().splitlines() or ["(no output)"]
    failed = f"GPU-hour plan failed: {lines[-1]}"
    print(failed if result.returncode else "\n".join(lines), file=sys.stderr)


atexit.register(
    print_dry_run_plan
)  # the executor (dry run or not) is known after parsing


localrules:
    download_model,
    prefetch_task,
    aggregate_figure,
    check_claims,
    plot_figure,


def alternatives(names):
    return "|".join(sorted(names, key=len, reverse=True))


wildcard_constraints:
    model=alternatives(config["models"]),
    task=alternatives(config["tasks"]),
    figure=alternatives(config["figures"]),


def model_marker(model):
    return rules.download_model.output.marker.format(model=model)


def evaluation_file(model, task, ablation, name="results.json"):
    return EVALUATION_FILE.format(model=model, task=task, ablation=ablation, name=name)


# (model, task) pairs with layer_set units of a proxy order: their layers are picked, when they
# run, from the proxies their baseline job writes (a planning step inside the graph).
PROXY_ORDERED = {
    (chunk.model, chunk.task)
    for chunk in evaluation_chunks(config)
    if any(ablation.order for ablation in chunk.ablations)
}


def baseline_proxies(model, task):
    names = (("proxies", PROXIES), ("blocks", BLOCK_DISTANCES))
    if (model, task) not in PROXY_ORDERED:
        names = names[:1]
    return {key: evaluation_file(model, task, "base", name) for key, name in names}


def chunk_inputs(chunk):
    """The evaluated model's checkpoint, the o_proj source's for replacement chunks, the task;
    for units of a proxy-ordered removal, the baseline's proxies that pick their layers.
    """
    inputs = {
        "model": model_marker(chunk.model),
        "task": rules.prefetch_task.output.marker.format(task=chunk.task),
    }
    if chunk.source:
        inputs["source"] = model_marker(chunk.source)
    if any(ablation.order for ablation in chunk.ablations):
        inputs |= baseline_proxies(chunk.model, chunk.task)
    return inputs


def chunk_outputs(chunk):
    """Per unit: lm-eval's results and samples; the baseline also has the layer proxies (and
    the block distances, where a removal sweep orders layers by them)."""
    outputs = {
        key: [evaluation_file(chunk.model, chunk.task, a, name) for a in chunk.ids]
        for key, name in (("results", "results.json"), ("samples", "samples.jsonl"))
    }
    if chunk.ids == ("base",):
        outputs |= baseline_proxies(chunk.model, chunk.task)
    return outputs


def canonical(value):
    """A param as canonical JSON text. Snakemake reruns a job when a param's text changes, and
    a dict's text follows its key order: re-saving the config in another order must not rerun.
    ``<`` is written as its JSON escape: the HTML report shows params inside a <script>, which a
    title or label holding ``</script>`` would end."""
    return json.dumps(value, sort_keys=True).replace("<", "\\u003c")


def get_model_spec(wildcards):
    return canonical(evaluated_model(config["models"][wildcards.model]))


def get_model_files(wildcards):
    return local_checkpoint_files(config["models"][wildcards.model])


def get_task_spec(wildcards):
    return canonical(task_settings(config, wildcards.task))


def get_figure_spec(wildcards):
    return canonical(config["figures"][wildcards.figure])


def get_figure_config(wildcards):
    """The part of the config one figure's aggregation reads: the figure, its models and tasks."""
    figure = config["figures"][wildcards.figure]
    series = [series for _, _, series in panel_series(figure)]
    return canonical(
        {
            "figures": {wildcards.figure: figure},
            "models": {s["model"]: config["models"][s["model"]] for s in series},
            "tasks": {s["task"]: config["tasks"][s["task"]] for s in series},
            "allow_mixed_provenance": config["allow_mixed_provenance"],
        }
    )


def evaluation_job(chunk):
    """The job's data (ablate.job.Job fields) as canonical JSON."""
    return canonical(
        {
            "model": evaluated_model(config["models"][chunk.model], chunk.backend),
            "task": task_settings(config, chunk.task),
            "data_dir": config["data_dir"],
            "seed": config["seed"],
            "prefix_reuse": config["evaluation"]["prefix_reuse"],
            "backend": chunk.backend,
            "backend_options": config["evaluation"].get(chunk.backend, {}),
        }
    )


def chunk_env(chunk):
    """Conda environment of an evaluation job: its backend's (vLLM pins its own transformers)."""
    return f"../../envs/{BACKENDS[chunk.backend].conda_env}"


def figure_unit_files(figure_id):
    """Every unit file a figure's aggregation reads."""
    files = []
    for model, task, ablation in figure_evaluations(config, figure_id):
        names = ["results.json", "samples.jsonl"]
        if ablation == "base":
            names.append(PROXIES)
        files += [evaluation_file(model, task, ablation, name) for name in names]
    return files


def get_figure_results(wildcards):
    """Declared, so a unit rewritten after the figure was built rebuilds it."""
    return figure_unit_files(wildcards.figure)


def figure_models(figure_id):
    figure = config["figures"][figure_id]
    return sorted({series["model"] for _, _, series in panel_series(figure)})


# The paper's claims (checked per figure); a config may name its own file (workdir-relative).
CLAIMS_FILE = (
    config["claims_file"] or Path(workflow.basedir) / "workflow/config/claims.yaml"
)
# Checked at parse time; each figure's check gets its own claims as data, so editing one claim
# reruns one figure's check, and moving the checkout reruns none.
RAW_CLAIMS = yaml.safe_load(Path(CLAIMS_FILE).read_text())
CLAIMS = parse_claims(RAW_CLAIMS, CLAIMS_FILE)


def claimed_figures(wildcards):
    """The figure and those its claims compare with (claims.yaml ``than``), in CSV order."""
    return claim_figures(CLAIMS, wildcards.figure, config["figures"])


def get_figure_claims(wildcards):
    return canonical(
        [
            raw
            for raw, claim in zip(RAW_CLAIMS, CLAIMS, strict=True)
            if claim.figure == wildcards.figure
        ]
    )


def get_claim_csvs(wildcards):
    """The CSV of each figure the claims read, named by figure."""
    return {
        figure: rules.aggregate_figure.output.csv.format(figure=figure)
        for figure in claimed_figures(wildcards)
    }


def get_claim_models(wildcards):
    """Per figure the claims read: the models it evaluates (other models: not comparable)."""
    return canonical(
        {figure: figure_models(figure) for figure in claimed_figures(wildcards)}
    )


def get_claim_num_layers(wildcards):
    """The layer count of each model of the figures the claims read (claims.yaml ``depth``)."""
    return canonical(
        {
            model: config["models"][model]["num_layers"]
            for figure in claimed_figures(wildcards)
            for model in figure_models(figure)
        }
    )


def get_claim_heads_per_group(wildcards):
    """Query heads per KV group of each model of the figures the claims read."""
    return canonical(
        {
            model: config["models"][model]["num_heads"]
            // config["models"][model]["num_kv_heads"]
            for figure in claimed_figures(wildcards)
            for model in figure_models(figure)
        }
    )


def get_figure_files(figure_id):
    """A figure target's files, and the unit files its aggregation reads: Snakemake does not
    look below an up-to-date CSV, so a unit deleted after the figure was built is evaluated again
    only if the target asks for it (and the CSV, older than it then, is rebuilt)."""
    outputs = [
        rules.plot_figure.output.png,
        rules.plot_figure.output.pdf,
        rules.aggregate_figure.output.csv,
        rules.aggregate_figure.output.provenance,
        rules.check_claims.output.csv,
    ]
    files = [pattern.format(figure=figure_id) for pattern in outputs]
    return files + figure_unit_files(figure_id)


def get_all_figures():
    return [
        path for figure_id in config["figures"] for path in get_figure_files(figure_id)
    ]


def chunk_mem_mb(chunk):
    """Weights (2 bytes/param in 16-bit, 4 in fp32) plus activations, and a vLLM KV cache held
    in host memory (CPU engines), doubled per retry."""
    model = config["models"][chunk.model]
    bytes_per_param = 4 if model["dtype"] == "float32" else 2
    megabytes = (model["params_b"] * bytes_per_param * 1.5 + 2) * 1024
    if chunk.backend == "vllm" and model["device"] == "cpu":
        engine = config["evaluation"]["vllm"]["engine_args"]
        megabytes += engine.get("kv_cache_memory_bytes", 4 * 2**30) / 2**20
    return lambda wildcards, attempt: int(megabytes * attempt)


def chunk_runtime(chunk):
    """Minutes: three times the prior-rate cost estimate (ablate.cost), on the task's counted
    tokens once the planner has counted them, doubled per retry."""
    task = config["tasks"][chunk.task]
    settings = task_settings(config, chunk.task)
    counted = model_counts_path(Path(), chunk.model, chunk.task, settings)
    seconds = chunk_seconds(
        config["models"][chunk.model],
        task,
        chunk.ablations,
        prior_rates(),
        config["evaluation"]["prefix_reuse"],
        chunk.backend,
        TaskCost.of(task, read_task_tokens(counted, settings)),
    )
    return lambda wildcards, attempt: math.ceil(3 * seconds / 60 + 5) * attempt
