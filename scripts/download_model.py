"""Rule download_model: fetch (or convert) one model checkpoint."""

import json
import sys
from pathlib import Path

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from ablate.download import download_model
from ablate.rule import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821
    out = Path(snakemake.output.marker)  # noqa: F821
    download_model(
        snakemake.wildcards.model,  # noqa: F821
        json.loads(snakemake.params.spec),  # noqa: F821
        out.parent,
        snakemake.config,  # noqa: F821 (the kinds its figures sweep, refused here if unproven)
    )
