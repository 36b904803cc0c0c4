"""Rule check_claims: the paper's claims about one figure, checked on its CSV (and on the CSVs of
the figures its claims compare with)."""

import json
import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
import pandas as pd

from ablate.aggregate import write_csv
from ablate.claims import check_claims, parse_claim
from ablate.rule import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821
    claims = [parse_claim(raw) for raw in json.loads(snakemake.params.claims)]  # noqa: F821
    models = json.loads(snakemake.params.models)  # noqa: F821 (figure id -> its model ids)
    frames = {figure: pd.read_csv(snakemake.input[figure]) for figure in models}  # noqa: F821
    num_layers = json.loads(snakemake.params.num_layers)  # noqa: F821 (model id -> its layers)
    heads_per_group = json.loads(snakemake.params.heads_per_group)  # noqa: F821
    figure_models = {f: set(ids) for f, ids in models.items()}
    table = check_claims(claims, frames, figure_models, num_layers, heads_per_group)
    write_csv(table, snakemake.output.csv)  # noqa: F821
