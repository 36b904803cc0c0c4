"""Rule prefetch_task: build the lm-eval task once, so its data is cached and checked."""

import json
import sys
from pathlib import Path

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from ablate.download import prefetch_task
from ablate.rule import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821
    params = snakemake.params  # noqa: F821
    prefetch_task(json.loads(params.task), params.data_dir, Path(snakemake.output.marker))  # noqa: F821
