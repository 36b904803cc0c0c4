"""Rule aggregate_figure: one tidy CSV of scores and Δs for a figure."""

import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from ablate.aggregate import aggregate, write_csv
from ablate.rule import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821
    params = snakemake.params  # noqa: F821
    frame = aggregate(params.config, snakemake.wildcards.figure, params.results_dir)  # noqa: F821
    write_csv(frame, snakemake.output.csv)  # noqa: F821
