"""Evaluation rules: one model under a chunk of ablations, one lm-eval evaluation per ablation."""

import json
import sys
from pathlib import Path

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from ablate.rule import rule_log, sole_writer

# The lock first: a second writer must not even truncate the running job's log.
with sole_writer(f"{snakemake.log[0]}.lock"), rule_log(snakemake.log[0], offline=True):  # noqa: F821
    import torch

    from ablate import backends
    from ablate.ablations import Ablation
    from ablate.job import Job

    torch.set_num_threads(snakemake.threads)  # noqa: F821
    params, source = snakemake.params, snakemake.input.get("source")  # noqa: F821
    task_record = json.loads(Path(snakemake.input.task).read_text())  # noqa: F821
    job = Job(
        model_dir=Path(snakemake.input.model).parent,  # noqa: F821
        source_dir=Path(source).parent if source else None,
        cache_dir=Path(params.cache_dir),
        block_distances=bool(snakemake.output.get("blocks")),  # noqa: F821
        registry_folders=task_record.get("registry_folders", []),  # older records: none
        **json.loads(params.job),
    )
    # One output folder per unit, in the chunk's order; a proxy-ordered layer set as the
    # layers its baseline's proxies pick (the inputs name them).
    folders = [Path(path).parent for path in snakemake.output.results]  # noqa: F821
    units = [Ablation.parse(a) for a in params.ablations]
    if proxies := snakemake.input.get("proxies"):  # noqa: F821
        from ablate.proxy import resolved_units

        units = resolved_units(units, Path(proxies).parent, job.model["num_layers"])
    backends.run(job, list(zip(units, folders, strict=True)))
