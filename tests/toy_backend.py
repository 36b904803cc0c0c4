"""A third backend for tests/test_backends.py: lm-eval's plain HFLM with the hook ablations, no
prefix sweep. One module and one registry entry are all a backend needs."""

from __future__ import annotations

from pathlib import Path

from ablate.ablations import Ablation, ablated
from ablate.job import Job
from ablate.models import load_model
from ablate.unit_loop import Progress, evaluate_units


def evaluate(job: Job, ablations: list[tuple[Ablation, Path]]) -> None:
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = load_model(job.model_dir, job.model)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=job.task["batch_size"])
    evaluate_units(
        lm,
        job,
        ablations,
        lambda ablation: ablated(model, ablation),
        lambda: (model, tokenizer),
        Progress([ablation.id for ablation, _ in ablations]),
        packages={"toy_backend": "1"},
    )
