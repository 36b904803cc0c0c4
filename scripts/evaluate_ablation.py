"""Rule evaluate_ablation: one lm-eval evaluation of one model under one ablation."""

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
    out_dir = Path(snakemake.output.results).parent  # noqa: F821
    evaluate(job, [(Ablation.parse(snakemake.wildcards.ablation), out_dir)])  # noqa: F821
