"""The workflow's file layout, relative to its working directory: the one owner of every path
pattern that the rules, the planner and the jobs share (Snakemake wildcards in braces)."""

from __future__ import annotations

MODEL_DIR = "resources/models/{model}"
DOWNLOAD_RECORD = "download.json"  # in a model's folder, written last by the download step
MODEL_RECORD = f"{MODEL_DIR}/{DOWNLOAD_RECORD}"
TASK_RECORD = "resources/tasks/{task}.json"  # prefetch_task's output
# The planner's counts per (model, task), keyed by what decides them (the task's settings and
# the tokenizer: ablate.tokens.counts_key), so configs that share a task id keep theirs apart.
TOKEN_COUNTS = "resources/tokens/{model}/{task}-{key}.json"
# Where neither the model nor the task is on the planning host: counts of the task's offline
# twin with the embedded model's tokenizer (ablate.tokens).
STAND_IN_DIR = "resources/tokens/_stand-in"
STAND_IN_COUNTS = f"{STAND_IN_DIR}/{{task}}-{{key}}.json"

EVALUATIONS = "results/evaluate"
TASK_DIR = "{model}/{task}"  # under EVALUATIONS: one folder per unit
UNIT_DIR = f"{TASK_DIR}/{{ablation}}"  # results.json, samples.jsonl (base: the proxies)
PROXIES = "proxies.csv"  # in the baseline's folder: per layer (ablate.proxy)
BLOCK_DISTANCES = "angular_blocks.csv"  # in the baseline's folder: per contiguous block
EVALUATION_FILE = f"{EVALUATIONS}/{UNIT_DIR}/{{name}}"
REQUEST_CACHES = "results/cache/{model}/{task}"  # outlive a killed job: its resubmission replays
EVALUATION_LOG = "logs/evaluate/{model}/{task}/{label}.log"
BENCHMARK = "benchmarks/evaluate/{model}/{task}/{label}.tsv"  # Snakemake's, per evaluation job
GPU_CHECK = "benchmarks/gpu_check.json"  # make gpu-check's measurements (ablate.gpu_check)

FIGURE_CSV = "results/aggregate/{figure}.csv"
FIGURE_PROVENANCE = "results/aggregate/{figure}.provenance.csv"
CLAIMS_CSV = "results/claims/{figure}.csv"
FIGURE_PNG = "results/figures/{figure}.png"
FIGURE_PDF = "results/figures/{figure}.pdf"
# The report's caption of a figure (config text escaped: ablate.plot.caption_rst)
FIGURE_CAPTION = "results/figures/{figure}.caption.rst"
