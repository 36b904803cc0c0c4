import math
import sys

import yaml

from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))

from ablate.ablations import ABLATION_PATTERN
from ablate.config import (
    ConfigError,
    check_config,
    figure_evaluations,
    o_proj_source,
    schema_error,
)
from ablate.plan import PRIOR_RATE, estimated_seconds

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
    plot_figure,


def alternatives(names):
    return "|".join(sorted(names, key=len, reverse=True))


wildcard_constraints:
    model=alternatives(config["models"]),
    source=alternatives(config["models"]),
    task=alternatives(config["tasks"]),
    figure=alternatives(config["figures"]),
    ablation=ABLATION_PATTERN,


def model_marker(model):
    return rules.download_model.output.marker.format(model=model)


def get_evaluation_models(wildcards):
    """The evaluated model's checkpoint, plus the o_proj source's for replacement ablations."""
    markers = {"model": model_marker(wildcards.model)}
    source = o_proj_source(wildcards.ablation)
    if source:
        markers["source"] = model_marker(source)
    return markers


def get_model_spec(wildcards):
    return config["models"][wildcards.model]


def get_task_spec(wildcards):
    return config["tasks"][wildcards.task]


def get_figure_spec(wildcards):
    return config["figures"][wildcards.figure]


def get_evaluation_job(wildcards):
    return {
        "model": config["models"][wildcards.model],
        "task": config["tasks"][wildcards.task],
        "data_dir": config["data_dir"],
        "seed": config["seed"],
    }


def get_figure_results(wildcards):
    pattern = rules.evaluate_ablation.output.results
    return [
        pattern.format(model=model, task=task, ablation=ablation)
        for model, task, ablation in figure_evaluations(config, wildcards.figure)
    ]


def get_figure_files(figure_id):
    outputs = [
        rules.plot_figure.output.png,
        rules.plot_figure.output.pdf,
        rules.aggregate_figure.output.csv,
    ]
    return [pattern.format(figure=figure_id) for pattern in outputs]


def get_all_figures():
    return [
        path for figure_id in config["figures"] for path in get_figure_files(figure_id)
    ]


def get_eval_resources_gpu(wildcards):
    return config["models"][wildcards.model]["gpus"]


def get_eval_resources_mem_mb(wildcards, attempt):
    """Weights (2 bytes/param in 16-bit, 4 in fp32) plus activations, doubled per retry."""
    model = config["models"][wildcards.model]
    bytes_per_param = 4 if model["dtype"] == "float32" else 2
    return int((model["params_b"] * bytes_per_param * 1.5 + 2) * 1024 * attempt)


def get_eval_runtime(wildcards, attempt):
    """Minutes: three times the planner's prior estimate (ablate.plan), doubled per retry."""
    model = config["models"][wildcards.model]
    task = config["tasks"][wildcards.task]
    return math.ceil(3 * estimated_seconds(model, task, PRIOR_RATE) / 60 + 5) * attempt
