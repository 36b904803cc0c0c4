"""Rule check_claims: the paper's claims about one figure, checked on its CSV (and on the CSVs of
the figures its claims compare with)."""

import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
import pandas as pd

from ablate.aggregate import write_csv
from ablate.claims import check_claims, load_claims
from ablate.rule import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821
    figure = snakemake.wildcards.figure  # noqa: F821
    claims = [c for c in load_claims(snakemake.input.claims) if c.figure == figure]  # noqa: F821
    models = snakemake.params.models  # noqa: F821 (figure id -> model ids, in input.csvs' order)
    frames = {f: pd.read_csv(path) for f, path in zip(models, snakemake.input.csvs, strict=True)}  # noqa: F821
    table = check_claims(claims, frames, {f: set(ids) for f, ids in models.items()})
    write_csv(table, snakemake.output.csv)  # noqa: F821
