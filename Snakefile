# Layer-, head- and o_proj-ablation studies of LLMs (Song et al. 2025, arXiv 2510.02091).
# Each figure of the active config is a target: `snakemake fig5`; `snakemake all` builds them all.
from snakemake.utils import min_version

min_version("9.0")


# The paper config unless --configfile names another (merging the two would mix their figures).
if not config:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/plot.smk"


rule all:
    default_target: True
    input:
        get_all_figures(),


for figure_id in config["figures"]:

    rule:
        name:
            figure_id
        input:
            get_figure_files(figure_id),
