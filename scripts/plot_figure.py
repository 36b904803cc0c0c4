"""Rule plot_figure: render a figure CSV as PNG and PDF."""

import json
import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
import pandas as pd

from ablate.plot import caption_rst, findings, plot_figure
from ablate.rule import rule_log

with rule_log(snakemake.log[0]):  # noqa: F821
    figure = json.loads(snakemake.params.figure)  # noqa: F821
    frame = pd.read_csv(snakemake.input.csv)  # noqa: F821
    titles = [panel.get("title", "") for panel in figure["panels"]]
    plot_figure(frame, figure["title"], titles, [snakemake.output.png, snakemake.output.pdf])  # noqa: F821
    with open(snakemake.output.caption, "w") as handle:  # noqa: F821
        handle.write(caption_rst(snakemake.wildcards.figure, figure, findings(frame)))  # noqa: F821
