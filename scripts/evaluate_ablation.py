"""Evaluation rules: one model under a chunk of ablations, one lm-eval evaluation per ablation."""

import sys
from pathlib import Path

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from ablate.rule import rule_log

with rule_log(snakemake.log[0], offline=True):  # noqa: F821
    import torch

    from ablate.ablations import Ablation
    from ablate.evaluate import Job, evaluate

    torch.set_num_threads(snakemake.threads)  # noqa: F821
    source = snakemake.input.get("source")  # noqa: F821
    job = Job(
        model_dir=Path(snakemake.input.model).parent,  # noqa: F821
        source_dir=Path(source).parent if source else None,
        cache_dir=Path(snakemake.params.cache_dir),  # noqa: F821
        **snakemake.params.job,  # noqa: F821
    )
    # results/evaluate/<model>/<task>/<ablation>/results.json: the folder names the ablation.
    folders = [Path(path).parent for path in snakemake.output.results]  # noqa: F821
    evaluate(job, [(Ablation.parse(folder.name), folder) for folder in folders])
