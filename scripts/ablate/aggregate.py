"""Turn per-ablation lm-eval results into one tidy CSV per figure, Δ against the baseline.

Besides lm-eval's scores, every row carries the paired statistics of its Δ over the same
documents (ablate.stats; Holm-corrected across all Δs of the figure) and, for layer-skip rows,
the unablated model's layer-importance proxies (ablate.proxy) with their Spearman correlation
to −Δ over the series.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from ablate.ablations import PROXY_COLUMN_PREFIX
from ablate.config import Run, figure_runs
from ablate.io import write_atomically
from ablate.paths import PROXIES as PROXIES_FILE
from ablate.paths import UNIT_DIR
from ablate.proxy_files import read_proxies
from ablate.stats import holm, paired_test, spearman

COLUMNS = [
    "figure", "panel", "series", "model", "task", "metric", "ablation_kind", "layer", "head", "ablation",
    "score", "baseline", "delta", "higher_is_better", "stderr", "n_samples", "hit_budget", "model_revision",
    "paired_stderr", "ci_low", "ci_high", "test", "p_value", "p_holm", "significant",
    "block_influence", "angular_distance", "spearman_block_influence", "spearman_angular_distance",
]  # fmt: skip
PROXIES = ("block_influence", "angular_distance")
ALPHA = 0.05  # family-wise error rate of the Holm correction over one figure


class ResultError(RuntimeError):
    """A result file that is missing, short or inconsistent; the message names the file."""


def result_path(results_dir: Path, model: str, task: str, ablation: str) -> Path:
    return (
        Path(results_dir)
        / UNIT_DIR.format(model=model, task=task, ablation=ablation)
        / "results.json"
    )


def metric_key(metric: str) -> str:
    return metric if "," in metric else f"{metric},none"


# Provenance that must agree across every result of one series (its baseline included).
PROVENANCE_KEYS = ("model_revision", "task_versions", "num_fewshot", "limit", "dtype", "packages")


def read_result(path: Path) -> dict[str, Any]:
    """A result and its document count, checked against the count lm-eval says it evaluated.

    A file that is not whole JSON (a job killed on a filesystem that lost the write) is an
    incomplete evaluation output: ResultError naming it and the fix.
    """
    if not path.exists():
        raise ResultError(f"{path}: missing (rerun the workflow to compute it)")
    fix = (
        f"an incomplete evaluation output: delete {path.parent} and rerun "
        "(the request cache replays what was computed)"
    )
    try:  # bytes: a bad encoding is a ValueError too
        record = json.loads(path.read_bytes())
    except ValueError as error:
        raise ResultError(f"{path}: not valid JSON ({error}); {fix}") from None
    samples = path.with_name("samples.jsonl")
    if not samples.exists():
        raise ResultError(f"{samples}: missing beside {path.name}")
    record["samples"] = []
    for number, line in enumerate(samples.read_bytes().splitlines(), 1):
        try:
            record["samples"].append(json.loads(line))
        except ValueError as error:
            raise ResultError(f"{samples}:{number}: not valid JSON ({error}); {fix}") from None
    docs = {(s["task"], s["doc_id"]) for s in record["samples"]}
    expected = sum(count["effective"] for count in record["n_samples"].values())
    if len(docs) != expected:
        raise ResultError(f"{samples}: {len(docs)} documents, lm-eval evaluated {expected}")
    record["n_docs"] = len(docs)
    return record


def per_document(record: dict[str, Any], metric: str, path: Path) -> pd.Series:
    """One metric's per-document values from a result's samples, indexed by (task, doc_id): a
    number, or for corpus-level metrics what lm-eval aggregates (e.g. (log-likelihood, words))."""
    name, flt = metric_key(metric).split(",")
    values = {
        (sample["task"], sample["doc_id"]): (
            tuple(sample[name]) if isinstance(sample[name], list) else float(sample[name])
        )
        for sample in record["samples"]
        if sample.get("filter", "none") == flt and name in sample
    }
    if not values:
        raise ResultError(
            f"{path.with_name('samples.jsonl')}: no per-document {name!r} under filter {flt!r}"
        )
    return pd.Series(values)


# Recorded since results carry it: compared where both sides have it.
RECORDED_LATER = ("model_files",)


def check_provenance(path: Path, record: dict, base_path: Path, base: dict) -> None:
    for key in (*PROVENANCE_KEYS, *RECORDED_LATER):
        mine, theirs = record["provenance"].get(key), base["provenance"].get(key)
        if key in RECORDED_LATER and None in (mine, theirs):
            continue
        if mine != theirs:
            raise ResultError(
                f"{path}: provenance {key} = {record['provenance'].get(key)!r} differs from "
                f"{base_path} ({base['provenance'].get(key)!r}); recompute one of them, or set "
                "allow_mixed_provenance: true to aggregate anyway"
            )


def metric_properties(record: dict[str, Any], metric: str) -> dict[str, Any]:
    """The metric's aggregation and direction as the evaluation recorded them (results written
    before they were recorded: a mean, higher is better)."""
    default = {"aggregation": "mean", "higher_is_better": True}
    return record.get("metrics", {}).get(metric_key(metric).split(",")[0], default)


def score(record: dict[str, Any], task: str, metric: str, path: Path) -> tuple[float, float]:
    results = record["results"][task]
    key = metric_key(metric)
    if key not in results:
        available = sorted(k for k in results if "," in k and "_stderr" not in k)
        raise ResultError(f"{path}: no metric {key!r} (available: {', '.join(available)})")
    name, flt = key.split(",")
    stderr = results.get(f"{name}_stderr,{flt}")
    return float(results[key]), float(stderr) if isinstance(stderr, (int, float)) else float("nan")


def aggregate(config: dict[str, Any], figure_id: str, results_dir: Path) -> pd.DataFrame:
    """Rows of the figure CSV; raises ResultError rather than leave a gap in the plot."""
    tasks = config["tasks"]
    cache: dict[Path, dict] = {}

    def load(model: str, task: str, ablation: str) -> tuple[Path, dict]:
        path = result_path(results_dir, model, task, ablation)
        if path not in cache:
            cache[path] = read_result(path)
        return path, cache[path]

    rows = []
    run: Run
    for run in figure_runs(config, figure_id):
        lm_task = tasks[run.task]["lm_eval_task"]
        base_path, base = load(run.model, run.task, "base")
        path, record = load(run.model, run.task, run.ablation)
        if record["n_docs"] != base["n_docs"]:
            raise ResultError(
                f"{path}: {record['n_docs']} documents, but the baseline {base_path} has {base['n_docs']}"
            )
        if not config.get("allow_mixed_provenance"):
            check_provenance(path, record, base_path, base)
        value, stderr = score(record, lm_task, run.metric, path)
        baseline, _ = score(base, lm_task, run.metric, base_path)
        budget = record["results"][lm_task].get("hit_budget,none")
        properties = metric_properties(record, run.metric)
        paired = paired_test(
            per_document(base, run.metric, base_path),
            per_document(record, run.metric, path),
            properties["aggregation"],
        )
        rows.append(
            {
                "figure": figure_id,
                "panel": run.panel,
                "series": run.series,
                "model": run.model,
                "task": run.task,
                "metric": run.metric,
                "ablation_kind": run.kind,
                "layer": run.layer,
                "head": run.head,
                "ablation": run.ablation,
                "score": value,
                "baseline": baseline,
                "delta": value - baseline,
                "higher_is_better": properties["higher_is_better"],
                "stderr": stderr,
                "n_samples": record["n_docs"],
                "hit_budget": budget,
                "model_revision": record["provenance"]["model_revision"],
                "paired_stderr": paired["stderr"],
                "ci_low": paired["ci_low"],
                "ci_high": paired["ci_high"],
                "test": paired["test"],
                "p_value": paired["p_value"],
            }
        )
    frame = pd.DataFrame(rows, columns=COLUMNS).astype({"head": "Int64", "hit_budget": "Int64"})
    # Holm over distinct tests: paper_head rows of one KV group share one evaluation and its test.
    test_key = ["metric", "model", "task", "ablation"]
    tests = frame.drop_duplicates(test_key)[[*test_key, "p_value"]]
    tests = tests.assign(p_holm=holm(tests["p_value"].to_numpy())).drop(columns="p_value")
    frame["p_holm"] = frame[test_key].merge(tests, on=test_key, how="left")["p_holm"].to_numpy()
    frame["significant"] = frame["p_holm"] < ALPHA
    return add_proxies(frame, results_dir, config["models"])


def harm(rows: pd.DataFrame) -> pd.Series:
    """How much worse each ablated score is than the baseline: −Δ, or Δ where lower is better
    (perplexity)."""
    sign = rows["higher_is_better"].astype(bool).map({True: -1.0, False: 1.0})
    return sign * rows["delta"]


def add_proxies(
    frame: pd.DataFrame, results_dir: Path, models: dict[str, dict[str, Any]]
) -> pd.DataFrame:
    """Proxy values of each layer or sublayer row (the baseline's proxies, validated for the
    model's layers: config ``models``), and per (panel, series) their Spearman ρ with the harm
    (−Δ; Δ where lower is better)."""
    with_proxy = frame[frame["ablation_kind"].isin(list(PROXY_COLUMN_PREFIX))]
    for (model, task), rows in with_proxy.groupby(["model", "task"]):
        path = result_path(results_dir, model, task, "base").with_name(PROXIES_FILE)
        if not path.exists():
            raise ResultError(f"{path}: missing (the baseline evaluation writes it)")
        columns = tuple(PROXY_COLUMN_PREFIX[k] + n for k in rows["ablation_kind"].unique()
                        for n in PROXIES)  # fmt: skip
        try:  # once for layer and sublayer rows
            proxies = read_proxies(path, models[model]["num_layers"], columns, gaps=columns)
        except ValueError as error:
            raise ResultError(str(error)) from None
        for kind, kind_rows in rows.groupby("ablation_kind"):
            for name in PROXIES:
                column = PROXY_COLUMN_PREFIX[kind] + name
                frame.loc[kind_rows.index, name] = proxies.loc[
                    kind_rows["layer"], column
                ].to_numpy()
    for _, rows in with_proxy.groupby(["panel", "series"]):
        for name in PROXIES:
            frame.loc[rows.index, f"spearman_{name}"] = spearman(
                frame.loc[rows.index, name], harm(rows)
            )
    return frame


def provenance_table(config: dict[str, Any], figure_id: str, results_dir: Path) -> pd.DataFrame:
    """Provenance of every evaluation a figure uses, one row each."""
    from ablate.config import figure_evaluations

    rows = []
    for model, task, ablation in figure_evaluations(config, figure_id):
        meta = json.loads(result_path(results_dir, model, task, ablation).read_text())["provenance"]
        rows.append({
            "model": model, "task": task, "ablation": ablation, "repo": meta["model"],
            "model_revision": meta["model_revision"], "dtype": meta["dtype"],
            "device": meta["device"], "seed": meta["seed"], "limit": meta["limit"],
            "num_fewshot": meta["num_fewshot"], "task_versions": json.dumps(meta["task_versions"]),
            "packages": json.dumps(meta["packages"]), "eval_seconds": meta.get("eval_seconds"),
        })  # fmt: skip
    return pd.DataFrame(rows)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Deterministic CSV (fixed float format), written atomically."""
    write_atomically(Path(path), frame.to_csv(index=False, float_format="%.6f"))
