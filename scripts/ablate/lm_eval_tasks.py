"""lm-eval's side of every backend: the task manager, the task objects, one evaluation per unit,
and the per-sample metrics lm-eval lacks (acc_ce)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ablate.ablations import Ablation
from ablate.job import Job
from ablate.metrics import acc_ce, mean_and_stderr

TASKS_DIR = Path(__file__).parent / "tasks"
log = logging.getLogger(__name__)


def registry_dir() -> Path:
    """lm-eval's own task folder (its registry), resolved as its index resolves YAML paths."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def task_manager(task: dict[str, Any], data_dir: str, registry_folders: Sequence[str] = ()):
    """Our task folder, then the task's ``task_paths`` (the config's folders that define it,
    relative to the working directory); lm-eval's registry only for ``local: false`` tasks, and
    of it only ``registry_folders`` where given (what prefetch found defines the task: indexing
    the registry's ~14k YAML files costs ~10 s per job).

    ``metadata`` reaches every task's ``custom_dataset`` loader: it carries ``data_dir``.
    """
    from lm_eval.tasks import TaskManager

    folders = [TASKS_DIR, *(Path(folder).resolve() for folder in task.get("task_paths", []))]
    whole_registry = not task.get("local", True)
    if whole_registry and registry_folders:
        # First, as the registry would be: our folders may override its names.
        folders = [registry_dir() / folder for folder in registry_folders] + folders
        whole_registry = False
    return TaskManager(
        include_path=[str(folder) for folder in folders],
        include_defaults=whole_registry,
        metadata={"data_dir": data_dir},
    )


def defining_registry_folders(manager, loaded: dict[str, Any]) -> list[str]:
    """The folders of lm-eval's registry (relative to it, outermost only) whose YAML files
    define a task as ``manager`` loaded it: its groups' and its tasks' files."""
    registry = registry_dir()
    folders = set()
    for name in [*loaded.get("groups", {}), *loaded["tasks"]]:
        entry = manager.task_index.get(str(name))
        if entry is not None and entry.yaml_path is not None:
            folder = Path(entry.yaml_path).resolve().parent
            if folder.is_relative_to(registry):
                folders.add(folder.relative_to(registry))
    outermost = {f for f in folders if not any(o in f.parents for o in folders)}
    return sorted(str(folder) for folder in outermost)


def task_configs(loaded: dict[str, Any]) -> str:
    """The built tasks' and groups' configurations (a group's decides how its score aggregates),
    as canonical text (to compare two builds)."""
    tasks = {str(name): task.dump_config() for name, task in loaded["tasks"].items()}
    groups = {str(name): group.to_dict() for name, group in loaded.get("groups", {}).items()}
    return json.dumps({"tasks": tasks, "groups": groups}, sort_keys=True, default=str)


def amortize_lm_eval_overheads() -> None:
    """Pay two fixed costs of lm-eval once per process instead of once per document or call.

    lm-eval compiles a task's Jinja template for every document it renders (~1 ms each, seconds
    per evaluation), and every ``simple_evaluate`` collects environment info by spawning
    subprocesses (~0.6 s). Neither changes a score; a job evaluating many units pays them once.
    """
    import lm_eval.evaluator
    import lm_eval.utils

    compile_template = functools.lru_cache(maxsize=None)(lm_eval.utils.env.from_string)
    lm_eval.utils.apply_template = lambda template, doc: compile_template(template).render(**doc)
    collect_env_info, env_info = lm_eval.evaluator.add_env_info, {}

    def add_env_info(storage: dict) -> None:
        if not env_info:
            collect_env_info(env_info)
        storage.update(env_info)

    lm_eval.evaluator.add_env_info = add_env_info


def set_aside_corrupt_caches(prefix: str) -> None:
    """A request cache (``<prefix>_rank<N>.db``) that SQLite cannot read is renamed to
    ``.corrupt`` with one warning, and its answers are computed again: a cache is a cache."""
    import sqlite3

    for database in Path(prefix).parent.glob(f"{Path(prefix).name}_rank*.db"):
        try:
            with contextlib.closing(sqlite3.connect(database)) as connection:
                healthy = connection.execute("PRAGMA quick_check").fetchone() == ("ok",)
        except sqlite3.DatabaseError:
            healthy = False
        if not healthy:
            database.rename(database.with_suffix(".corrupt"))
            log.warning(
                "%s: request cache unreadable (truncated or corrupt), moved to %s; its answers "
                "are computed again", database, database.with_suffix(".corrupt").name,
            )  # fmt: skip


def load_task(manager, name: str) -> tuple[list, dict[str, Any]]:
    """The task (or group of tasks) object, built once per job and re-evaluated per ablation,
    and its tasks by name (the group's subtasks, or the task itself)."""
    loaded = manager.load([name])
    return [loaded["groups"].get(name) or loaded["tasks"][name]], loaded["tasks"]


def metric_properties(tasks: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per metric of the built ``tasks``: lm-eval's aggregation of its per-document values (by
    registered name: mean, weighted_perplexity, bits_per_byte, ...) and whether higher is
    better, so Δ's direction and its paired statistics follow the metric."""
    properties = {}
    for built in tasks.values():
        better = built.higher_is_better()
        for metric, aggregation in built.aggregation().items():
            properties[metric] = {
                "aggregation": aggregation.__name__,
                "higher_is_better": bool(better.get(metric, True)),
            }
    return properties


def run_lm_eval(lm, job: Job, manager, tasks: list, ablation: Ablation) -> dict[str, Any]:
    import lm_eval

    task = job.task
    cache = job.request_cache(ablation)
    if cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        set_aside_corrupt_caches(cache)
    return lm_eval.simple_evaluate(
        model=lm,
        use_cache=cache,
        tasks=tasks,
        task_manager=manager,  # without one, lm-eval indexes its ~10k task files again
        num_fewshot=task.get("num_fewshot"),
        limit=task.get("limit"),
        gen_kwargs=task.get("gen_kwargs"),
        apply_chat_template=task.get("chat_template", False),
        fewshot_as_multiturn=task.get("chat_template", False),
        log_samples=True,
        bootstrap_iters=1000,  # mean metrics get lm-eval's closed-form stderr
        random_seed=job.seed,
        numpy_random_seed=job.seed,
        torch_random_seed=job.seed,
        fewshot_random_seed=job.seed,
    )


def add_sample_metrics(
    lm, output: dict[str, Any], task: dict[str, Any], lengths: dict[tuple[str, str], int]
) -> list[dict]:
    """Add acc_ce to every multiple-choice sample and its mean to the results.

    ``lengths`` memoizes, across the units of a job, how many tokens lm-eval scores for each
    (context, continuation) pair (its own encoding).
    """
    samples = [dict(s, task=name) for name, per_task in output["samples"].items() for s in per_task]
    results = output["results"][task["lm_eval_task"]]
    if task["protocol"] == "loglikelihood":
        for sample in samples:
            lls = [resp[0][0] for resp in sample["resps"]]
            for args in map(tuple, sample["arguments"]):
                if args not in lengths:
                    lengths[args] = len(lm._encode_pair(*args)[1])
            counts = [lengths[tuple(args)] for args in sample["arguments"]]
            sample["acc_ce"] = acc_ce(lls, counts, int(sample["target"]))
        mean, stderr = mean_and_stderr([s["acc_ce"] for s in samples])
        results["acc_ce,none"], results["acc_ce_stderr,none"] = mean, stderr
    return samples
