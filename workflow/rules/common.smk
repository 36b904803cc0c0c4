import math
import sys

import yaml

from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))

from ablate.config import (
    ConfigError,
    check_config,
    evaluation_chunks,
    figure_evaluations,
    panel_series,
    schema_error,
)
from ablate.plan import PRIOR_RATE, chunk_seconds

# One line naming the key before Snakemake's full report; then fill the schema's defaults.
SCHEMA = Path(workflow.basedir) / "workflow/schemas/config.schema.yaml"
if problem := schema_error(config, yaml.safe_load(SCHEMA.read_text())):
    raise WorkflowError(f"config error: {problem}")
validate(config, schema=str(SCHEMA), set_default=True)
try:
    check_config(config)
except ConfigError as error:
    raise WorkflowError(f"config error: {error}") from None


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
    source=alternatives(config["models"]),
    task=alternatives(config["tasks"]),
    figure=alternatives(config["figures"]),


def model_marker(model):
    return rules.download_model.output.marker.format(model=model)


EVALUATION_FILE = "results/evaluate/{model}/{task}/{ablation}/{name}"


def evaluation_file(model, task, ablation, name="results.json"):
    return EVALUATION_FILE.format(model=model, task=task, ablation=ablation, name=name)


def chunk_inputs(chunk):
    """The evaluated model's checkpoint, the o_proj source's for replacement chunks, the task."""
    inputs = {
        "model": model_marker(chunk.model),
        "task": rules.prefetch_task.output.marker.format(task=chunk.task),
    }
    if chunk.source:
        inputs["source"] = model_marker(chunk.source)
    return inputs


def chunk_outputs(chunk):
    """Per unit: lm-eval's results and samples; the baseline also has the layer proxies."""
    outputs = {
        key: [
            evaluation_file(chunk.model, chunk.task, a, name) for a in chunk.ablations
        ]
        for key, name in (("results", "results.json"), ("samples", "samples.jsonl"))
    }
    if chunk.ablations == ("base",):
        outputs["proxies"] = evaluation_file(
            chunk.model, chunk.task, "base", "proxies.csv"
        )
    return outputs


def get_model_spec(wildcards):
    return config["models"][wildcards.model]


def get_task_spec(wildcards):
    return config["tasks"][wildcards.task]


def get_figure_spec(wildcards):
    return config["figures"][wildcards.figure]


def evaluation_job(chunk):
    return {
        "model": config["models"][chunk.model],
        "task": config["tasks"][chunk.task],
        "data_dir": config["data_dir"],
        "seed": config["seed"],
        "prefix_reuse": config["evaluation"]["prefix_reuse"],
        "backend": chunk.backend,
        "vllm": config["evaluation"]["vllm"] if chunk.backend == "vllm" else {},
    }


def chunk_env(chunk):
    """Conda environment of an evaluation job: vLLM pins its own transformers."""
    return f"../../envs/{'vllm' if chunk.backend == 'vllm' else 'eval'}.yaml"


def get_figure_results(wildcards):
    return [
        evaluation_file(*evaluation)
        for evaluation in figure_evaluations(config, wildcards.figure)
    ]


def get_figure_models(wildcards):
    figure = config["figures"][wildcards.figure]
    return sorted({series["model"] for _, _, series in panel_series(figure)})


# The paper's claims (checked per figure); a config may name its own file (workdir-relative).
CLAIMS_FILE = config["claims_file"] or str(
    Path(workflow.basedir) / "workflow/config/claims.yaml"
)


def get_figure_files(figure_id):
    outputs = [
        rules.plot_figure.output.png,
        rules.plot_figure.output.pdf,
        rules.aggregate_figure.output.csv,
        rules.aggregate_figure.output.provenance,
        rules.check_claims.output.csv,
    ]
    return [pattern.format(figure=figure_id) for pattern in outputs]


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
    """Minutes: three times the planner's prior estimate (ablate.plan), doubled per retry."""
    seconds = chunk_seconds(
        config["models"][chunk.model],
        config["tasks"][chunk.task],
        chunk.ablations,
        PRIOR_RATE,
        config["evaluation"]["prefix_reuse"],
        chunk.backend,
    )
    return lambda wildcards, attempt: math.ceil(3 * seconds / 60 + 5) * attempt
