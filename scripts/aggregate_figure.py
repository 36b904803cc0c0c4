"""Rule aggregate_figure: one tidy CSV of scores, Δs and their statistics for a figure, and the
provenance of every evaluation it uses."""

import json
import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from ablate.aggregate import aggregate, provenance_table, write_csv
from ablate.rule import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821
    params, figure, output = snakemake.params, snakemake.wildcards.figure, snakemake.output  # noqa: F821
    config = json.loads(params.config)  # the figure, its models and tasks
    write_csv(aggregate(config, figure, params.results_dir), output.csv)
    write_csv(provenance_table(config, figure, params.results_dir), output.provenance)
