"""The per-unit loop every backend shares: one lm-eval evaluation per ablation unit, written
atomically per unit, and the baseline's layer proxies. It imports no backend: each backend passes
its lm-eval model, how to apply an ablation, and how to get the unablated HF model.

Results are written atomically (temp file, then rename), samples first and results.json last, so
an interrupted job never leaves a file a later run would trust.

A job's log gets plain progress lines (:class:`Progress`): one per finished unit and, at least
every 30 s, the unit and step in progress with an ETA.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
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
    metric_properties,
    run_lm_eval,
    task_manager,
)
from ablate.paths import BLOCK_DISTANCES, PROXIES
from ablate.proxy import block_distances, layer_proxies, prompt_batches

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
# Request-cache entries beside lm-eval's "generate_until" ones: whether the generation used its
# whole max_gen_toks (the cached text, cut at a stop sequence or a reasoning trace, cannot say).
BUDGET_ATTR = "generate_until_hit_budget"
PROGRESS_INTERVAL_S = 30.0  # default heartbeat; the environment's ABLATE_PROGRESS_S overrides it
log = logging.getLogger("ablate.progress")


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """A job's progress as plain log lines, for ``tail -f`` on its log: :meth:`unit_done` logs
    one line per finished unit, and a heartbeat thread every ``interval_s`` (default: the
    environment's ``ABLATE_PROGRESS_S``, else 30) the unit and step in progress (sweep batches,
    generations: :meth:`step`) with an ETA: of the step while one runs, else from the time of
    the last finished unit. ``clock`` tells the time (monotonic seconds)."""

    def __init__(
        self,
        units: Sequence[str],
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.units = list(units)
        default = float(os.environ.get("ABLATE_PROGRESS_S", PROGRESS_INTERVAL_S))
        self.interval_s = default if interval_s is None else interval_s
        self.clock = clock  # seconds; tests pass their own
        self.started = self.unit_started = clock()
        self.unit_seconds: list[float] = []
        self._step: tuple[str, int, int, float] | None = None  # what, done, total, since
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="progress", daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            log.info(self.line())

    def step(self, what: str, done: int, total: int) -> None:
        """``done`` of ``total`` parts of the current step are finished; 0 starts the step."""
        step = self._step
        if done == 0 or step is None or step[0] != what or step[2] != total:
            self._step = (what, done, total, self.clock())
        else:
            self._step = (what, done, total, step[3])

    def unit_done(self, unit: str, documents: int, scores: dict[str, float]) -> float:
        """Log the finished unit's line; its seconds."""
        now = self.clock()
        seconds, self.unit_started, self._step = now - self.unit_started, now, None
        self.unit_seconds.append(seconds)
        shown = " ".join(f"{name}={value:.4g}" for name, value in scores.items())
        log.info(
            "unit %s done (%d/%d): %d documents, %.1f s, %s",
            unit, len(self.unit_seconds), len(self.units), documents, seconds, shown,
        )  # fmt: skip
        return seconds

    def line(self) -> str:
        now, finished = self.clock(), len(self.unit_seconds)
        current = self.units[min(finished, len(self.units) - 1)]
        text = (
            f"progress: unit {min(finished + 1, len(self.units))}/{len(self.units)} {current}, "
            f"{finished} done, {_duration(now - self.started)} elapsed"
        )
        left = len(self.units) - finished - 1  # after the current one
        step = self._step
        if step is not None:
            what, done, total, since = step
            text += f"; {what} {done}/{total}"
            if done:
                text += f", ETA {_duration((now - since) / done * (total - done))}"
            return text + (f", then {left} more units" if left > 0 else "")
        if finished:  # the last unit, not the mean: a sweep's first unit computes them all
            last = self.unit_seconds[-1]
            eta = max(last * (left + 1) - (now - self.unit_started), 0.0)
            return text + f"; ETA {_duration(eta)} (last unit {last:.0f} s)"
        return text + "; ETA unknown until a unit or step finishes"


class BudgetCacheHook:
    """lm-eval's request-cache hook, also caching beside each generation whether it used its
    whole budget: the flags :meth:`BudgetTracking.record_budget_hits` queued, in row order (the
    order lm-eval caches the generations of a batch in). A flag is keyed by the request's own
    arguments (``request_args``, by context), as :func:`cached_budget_hits` looks it up: lm-eval's
    vLLM model caches a generation under generation settings it has rewritten."""

    def __init__(self, inner: Any, flags: deque[bool], request_args: dict[str, tuple]) -> None:
        self.inner, self.flags, self.request_args = inner, flags, request_args

    def add_partial(self, attr: str, req: Any, res: Any) -> None:
        self.inner.add_partial(attr, req, res)
        if attr == "generate_until" and self.flags:
            key = self.request_args.get(req[0], req)
            self.inner.add_partial(BUDGET_ATTR, key, self.flags.popleft())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class BudgetTracking:
    """Mixin for an lm-eval model class (before it in the bases): counts generations that used
    their whole ``max_gen_toks`` (``hit_budget``), keeps each one's flag in the request cache
    (:class:`BudgetCacheHook`) so a unit replayed from the cache reports the same count
    (:func:`cached_budget_hits`), and reports generations done to ``progress``. The backend's
    ``_model_generate`` calls :meth:`record_budget_hits` with one flag per generated row."""

    hit_budget = 0

    def __init__(self, *args: Any, progress: Progress | None = None, **kwargs: Any) -> None:
        self.progress = progress  # the job's (generations done are a step of its units)
        self._budget_flags: deque[bool] = deque()
        self._request_args: dict[str, tuple] = {}  # context -> arguments of the current call
        self._generations = (0, 0)  # done, total of the current generate_until call
        super().__init__(*args, **kwargs)
        self.cache_hook = self._budget_hook(self.cache_hook)

    def _budget_hook(self, cache_hook: Any) -> BudgetCacheHook:
        return BudgetCacheHook(cache_hook, self._budget_flags, self._request_args)

    def set_cache_hook(self, cache_hook: Any) -> None:
        super().set_cache_hook(self._budget_hook(cache_hook))  # type: ignore[misc]

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        self._budget_flags.clear()
        self._request_args.clear()
        self._request_args.update((r.args[0], r.args) for r in requests)
        self._generations = (0, len(requests))
        if self.progress is not None:
            self.progress.step("generations", 0, len(requests))
        # No progress bar (its \r updates garble a log): ``progress`` reports instead.
        return super().generate_until(requests, disable_tqdm=True)  # type: ignore[misc]

    def record_budget_hits(self, flags: list[bool]) -> None:
        self.hit_budget += sum(flags)
        self._budget_flags.extend(flags)
        done, total = self._generations
        self._generations = (done + len(flags), total)
        if self.progress is not None:
            self.progress.step("generations", min(done + len(flags), total), total)


def cached_budget_hits(lm, cache: str, samples: list[dict]) -> tuple[int, int]:
    """(generations that used their whole budget, generations whose flag the cache lacks) over
    the unit's requests, from the request cache at ``cache`` (lm-eval's ``use_cache`` prefix)."""
    from lm_eval.api.model import hash_args
    from sqlitedict import SqliteDict

    rank = getattr(lm, "rank", 0) or int(os.environ.get("LOCAL_RANK", "0"))
    path = Path(f"{cache}_rank{rank}.db")  # lm-eval's name for it
    requests = {
        (s["task"], s["doc_id"], index): args
        for s in samples
        for index, args in enumerate(s["arguments"])
    }  # one sample per filter: each request once
    if not path.exists():
        return 0, len(requests)
    hits = unknown = 0
    with SqliteDict(str(path), flag="r") as db:
        for args in requests.values():
            flag = db.get(hash_args(BUDGET_ATTR, args))
            hits += bool(flag)
            unknown += flag is None
    return hits, unknown


def unit_scores(results: dict[str, Any]) -> dict[str, float]:
    """A results entry's metrics (without their standard errors), for the unit's log line."""
    return {
        name.removesuffix(",none"): value
        for name, value in results.items()
        if "," in name and "_stderr" not in name and isinstance(value, int | float)
    }


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
        "model_files": job.model_files,
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


def write_result(
    out_dir: Path,
    output: dict[str, Any],
    samples: list[dict],
    meta: dict,
    metrics: dict[str, dict[str, Any]],
) -> None:
    """Samples first, results.json last: results.json existing means the unit is complete.
    ``metrics``: each metric's aggregation and direction (:func:`metric_properties`)."""
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
        "metrics": metrics,
        "provenance": meta,
    }
    write_atomically(out_dir / "results.json", json.dumps(record, indent=1, default=str))


def write_proxies(
    model,
    tokenizer,
    samples: list[dict],
    out_dir: Path,
    batch_size: int,
    max_length: int,
    blocks: bool,
) -> None:
    """Layer-importance proxies of the unablated HF ``model`` over the task's own prompts (each
    document's context, as lm-eval built it; a rolling task's: each document), beside the
    baseline's results: per layer, and with ``blocks`` per contiguous block (a multi-layer
    removal's order)."""
    contexts = list(dict.fromkeys(args[0] for s in samples for args in s["arguments"]))
    passes = [(PROXIES, layer_proxies)]
    if blocks:
        passes.append((BLOCK_DISTANCES, block_distances))
    for name, proxies in passes:
        frame = proxies(model, prompt_batches(tokenizer, contexts, batch_size, max_length))
        write_atomically(out_dir / name, frame.to_csv(index=False, float_format="%.6f"))


def evaluate_units(
    lm,
    job: Job,
    ablations: list[tuple[Ablation, Path]],
    applied: Callable[[Ablation], AbstractContextManager],
    unablated_hf_model: Callable[[], tuple[Any, Any]],
    progress: Progress,
    packages: dict[str, str] | None = None,
) -> None:
    """One lm-eval evaluation of ``lm`` per (ablation, output folder), inside ``applied(ablation)``
    (the backend's way of applying a unit: hooks, a shared-prefix sweep, weight edits);
    ``lm.hit_budget`` counts the unit's generations that used their whole budget. The baseline's
    folder also gets the layer proxies, after every unit, from the (model, tokenizer)
    ``unablated_hf_model()`` returns (proxies need hidden states). ``progress`` logs the job's
    progress (the backend wires its steps, sweep batches or generations, into it). ``packages``:
    the backend's own package versions, for the provenance."""
    amortize_lm_eval_overheads()
    manager = task_manager(job.task, job.data_dir, job.registry_folders)
    tasks, built = load_task(manager, job.task["lm_eval_task"])
    metrics = metric_properties(built)
    lengths: dict[tuple[str, str], int] = {}
    baseline = None
    with progress:
        for ablation, out_dir in ablations:
            start = time.perf_counter()
            lm.hit_budget = 0
            with applied(ablation):
                output = run_lm_eval(lm, job, manager, tasks, ablation)
            samples = add_sample_metrics(lm, output, job.task, lengths)
            results = output["results"][job.task["lm_eval_task"]]
            if job.task["protocol"] == "generate_until":
                results["hit_budget,none"] = budget_hits(lm, job, ablation, samples)
            meta = provenance(job, ablation, output, packages or {})
            meta["eval_seconds"] = round(time.perf_counter() - start, 2)
            write_result(Path(out_dir), output, samples, meta, metrics)
            documents = len({(s["task"], s["doc_id"]) for s in samples})
            progress.unit_done(ablation.id, documents, unit_scores(results))
            if ablation.kind == "base":
                baseline = samples, Path(out_dir)
        if baseline is not None:
            model, tokenizer = unablated_hf_model()
            batch_size = job.task.get("batch_size", 16)
            write_proxies(
                model, tokenizer, *baseline, batch_size, lm.max_length, job.block_distances
            )


def budget_hits(lm, job: Job, ablation: Ablation, samples: list[dict]) -> int:
    """The unit's generations that used their whole budget: from the request cache, which holds
    a flag for every generation it holds (so a unit replayed from it, wholly or in part, counts
    as an uninterrupted one), else as counted live by a :class:`BudgetTracking` model."""
    cache = job.request_cache(ablation)
    if cache is None:
        return lm.hit_budget
    hits, unknown = cached_budget_hits(lm, cache, samples)
    if unknown:
        log.warning(
            "%s: %d generations in the request cache %s have no hit_budget flag (cached by an "
            "older version?): hit_budget counts only the others; delete the cache to recount",
            ablation.id, unknown, cache,
        )  # fmt: skip
    return hits
