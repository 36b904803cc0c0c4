"""Rule prefetch_task: build the lm-eval task once, so its data is cached and checked."""

import json
import sys
from pathlib import Path

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from ablate.config import ConfigError, task_metric_requests
from ablate.download import prefetch_task
from ablate.rule import rule_log

failure = None
with rule_log(snakemake.log[0]):  # noqa: F821
    params, task_id = snakemake.params, snakemake.wildcards.task  # noqa: F821
    # The figures' metrics come from the config, not params: adding a figure must not rerun this
    # rule (its output is every evaluation's input); the workflow checks later figures itself.
    metrics = task_metric_requests(snakemake.config, task_id)  # noqa: F821
    try:
        out = Path(snakemake.output.marker)  # noqa: F821
        prefetch_task(json.loads(params.task), params.data_dir, out, task_id, metrics)
    except ConfigError as error:  # one line, in the log and on the terminal
        failure = f"config error: {error}"
        print(failure, file=sys.stderr)
if failure:
    sys.exit(failure)
