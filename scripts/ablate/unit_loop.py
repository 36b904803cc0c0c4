"""The per-unit loop every backend shares: one lm-eval evaluation per ablation unit, written
atomically per unit, and the baseline's layer proxies. It imports no backend: each backend passes
its lm-eval model, how to apply an ablation, and how to get the unablated HF model.

Results are written atomically (temp file, then rename), samples first and results.json last, so
an interrupted job never leaves a file a later run would trust.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from ablate.ablations import Ablation
from ablate.io import write_atomically
from ablate.job import Job
from ablate.lm_eval_tasks import (
    add_sample_metrics,
    amortize_lm_eval_overheads,
    load_task,
    run_lm_eval,
    task_manager,
)
from ablate.proxy import layer_proxies, prompt_batches

SAMPLE_FIELDS = (
    "task",
    "doc_id",
    "filter",
    "target",
    "resps",
    "filtered_resps",
    "doc_hash",
    "prompt_hash",
)


def provenance(
    job: Job, ablation: Ablation, output: dict[str, Any], packages: dict[str, str]
) -> dict[str, Any]:
    """What produced a result: checkpoint, task versions, settings and the backend's packages."""
    import lm_eval
    import torch
    import transformers

    return {
        "model": job.model.get("repo_id", "embedded"),
        "model_revision": job.model_revision,
        "ablation": ablation.id,
        "task": job.task["lm_eval_task"],
        "task_versions": output.get("versions", {}),
        "num_fewshot": job.task.get("num_fewshot"),
        "limit": job.task.get("limit"),
        "dtype": job.model.get("dtype", "float32"),
        "device": job.model.get("device", "cpu"),
        "seed": job.seed,
        "backend": job.backend,
        "packages": {
            "lm_eval": lm_eval.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
        | packages,
    }


def write_result(out_dir: Path, output: dict[str, Any], samples: list[dict], meta: dict) -> None:
    """Samples first, results.json last: results.json existing means the unit is complete."""
    lines = []
    for sample in samples:
        kept = {k: sample[k] for k in SAMPLE_FIELDS if k in sample}
        kept.update({m: sample[m] for m in sample["metrics"]})
        if "acc_ce" in sample:
            kept["acc_ce"] = sample["acc_ce"]
        lines.append(json.dumps(kept, default=str))
    write_atomically(out_dir / "samples.jsonl", "\n".join(lines) + "\n")
    record = {
        "results": output["results"],
        "n_samples": output.get("n-samples", {}),
        "configs": output.get("configs", {}),
        "provenance": meta,
    }
    write_atomically(out_dir / "results.json", json.dumps(record, indent=1, default=str))


def write_proxies(
    model, tokenizer, samples: list[dict], out_dir: Path, batch_size: int, max_length: int
) -> None:
    """Layer-importance proxies of the unablated HF ``model`` over the task's own prompts (each
    document's context, as lm-eval built it), beside the baseline's results."""
    contexts = list(dict.fromkeys(args[0] for s in samples for args in s["arguments"]))
    frame = layer_proxies(model, prompt_batches(tokenizer, contexts, batch_size, max_length))
    write_atomically(out_dir / "proxies.csv", frame.to_csv(index=False, float_format="%.6f"))


def evaluate_units(
    lm,
    job: Job,
    ablations: list[tuple[Ablation, Path]],
    applied: Callable[[Ablation], AbstractContextManager],
    unablated_hf_model: Callable[[], tuple[Any, Any]],
    packages: dict[str, str] | None = None,
) -> None:
    """One lm-eval evaluation of ``lm`` per (ablation, output folder), inside ``applied(ablation)``;
    ``lm.hit_budget`` counts the unit's generations that used their whole budget. The baseline's
    folder also gets the layer proxies, after every unit, from the (model, tokenizer)
    ``unablated_hf_model()`` returns (proxies need hidden states). ``packages``: the backend's
    own package versions, for the provenance."""
    amortize_lm_eval_overheads()
    manager = task_manager(job.task, job.data_dir)
    tasks = load_task(manager, job.task["lm_eval_task"])
    lengths: dict[tuple[str, str], int] = {}
    baseline = None
    for ablation, out_dir in ablations:
        start = time.perf_counter()
        lm.hit_budget = 0
        with applied(ablation):
            output = run_lm_eval(lm, job, manager, tasks, ablation)
        samples = add_sample_metrics(lm, output, job.task, lengths)
        if job.task["protocol"] == "generate_until":
            output["results"][job.task["lm_eval_task"]]["hit_budget,none"] = lm.hit_budget
        meta = provenance(job, ablation, output, packages or {})
        meta["eval_seconds"] = round(time.perf_counter() - start, 2)
        write_result(Path(out_dir), output, samples, meta)
        if ablation.kind == "base":
            baseline = samples, Path(out_dir)
    if baseline is not None:
        model, tokenizer = unablated_hf_model()
        batch_size = job.task.get("batch_size", 16)
        write_proxies(model, tokenizer, *baseline, batch_size, lm.max_length)
