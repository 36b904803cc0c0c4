"""Rule check_claims: the paper's claims about one figure, checked on its CSV."""

import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
import pandas as pd

from ablate.aggregate import write_csv
from ablate.claims import check_claims, load_claims
from ablate.rule import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821
    figure = snakemake.wildcards.figure  # noqa: F821
    claims = [c for c in load_claims(snakemake.input.claims) if c.figure == figure]  # noqa: F821
    frame = pd.read_csv(snakemake.input.csv)  # noqa: F821
    table = check_claims(claims, {figure: frame}, {figure: set(snakemake.params.models)})  # noqa: F821
    write_csv(table, snakemake.output.csv)  # noqa: F821
