# Layer-, head- and o_proj-ablation studies of LLMs (Song et al. 2025, arXiv 2510.02091).
# Each figure of the active config is a target: `snakemake fig5`; `snakemake all` builds them all.
import sys

from snakemake.utils import min_version

min_version("9.0")

sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))

from ablate.config import ConfigError, load_config_file

# Snakemake keeps the last of two equal keys and names no line of a YAML error, so the config
# files are read again, strictly, before any job: the --configfile files, else the default one
# (below); missing ones Snakemake reports. (It parses --configfile before this file runs, so a
# syntax error there stops it first: `python -m ablate.plan all --configfile X` names the line.)
for config_path in workflow.overwrite_configfiles or (
    [] if config else ["config.yaml"]
):
    if Path(config_path).exists():
        try:
            load_config_file(config_path)
        except ConfigError as error:
            raise WorkflowError(f"config error: {error}") from None

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
