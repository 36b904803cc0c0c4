"""Offline copies of the hub datasets lm-eval's registered tasks load, as `datasets`' own cache.

    python -m ablate.offline_datasets --data-dir ../shared/data --out resources/hf
                                      [--mmlu-subjects anatomy,virology]

then, wherever there is no internet (copy the folder there)::

    export HF_DATASETS_CACHE=$PWD/resources/hf/datasets   # or HF_HOME=$PWD/resources/hf
    export HF_HUB_OFFLINE=1

and lm-eval's ``hellaswag``, ``mathqa``, ``openbookqa``, ``mmlu*`` and ``gsm8k*`` load unchanged.
`datasets` writes lock files (and hellaswag's process_docs its map cache) into that folder, so it
must be writable; a read-only site copy works through a tree of links in scratch
(``cp -rs /site/hf/datasets $TMPDIR/hf-datasets``, then point HF_DATASETS_CACHE there).

Why the Arrow cache and not a hub snapshot: with HF_HUB_OFFLINE=1, datasets 5.x never opens the
hub cache for a repo id (``dataset_module_factory`` calls ``_raise_if_offline_mode_is_enabled``
before ``hf_hub_download``) and falls back to ``CachedDatasetModuleFactory``: the newest
``<HF_DATASETS_CACHE>/<namespace>___<name>/<config>/<version>/<hash>/`` whose
``dataset_info.json`` names that config, read by ``datasets/packaged_modules/cache``. This module
writes exactly that folder through a `datasets` builder (file names, shard lengths and the info
file are the library's), with the hub repos' config names and features.

Missing splits: lm-eval 0.4.13 builds a task's few-shot pool from ``training_split`` whenever the
YAML names one, even 0-shot (``ConfigurableTask.__init__`` -> ``fewshot_docs``), and `datasets`
cannot read back an empty split ("corresponds to no data"). So the ``train`` split that hellaswag,
mathqa and openbookqa name but ../shared/data lacks holds one placeholder row: 0-shot runs (the
paper's) put it in the pool but never sample it, and a few-shot run of those tasks fails rather
than prompt with it. ``offline_datasets.json`` beside ``datasets/`` lists every split, its rows
and its source.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets import ClassLabel, Features, List, Value
from datasets.builder import Key

from ablate.io import write_atomically

STRING = Value("string")
MISSING = "PLACEHOLDER: this split is not in the offline data; only 0-shot evaluation works"
MANIFEST = "offline_datasets.json"


@dataclass(frozen=True)
class Repo:
    """A hub dataset repo: its features and, per config, the shared file of each split."""

    repo_id: str
    features: Features
    configs: dict[str, dict[str, str]]
    split_by: str | None = None  # also one config per value of this field (cais/mmlu: subject)
    # Splits lm-eval's YAMLs require but the shared data lack: one row each, whose answer is no
    # valid choice, so lm-eval raises if it ever becomes a few-shot example.
    placeholders: dict[str, dict[str, Any]] = field(default_factory=dict)


# Features as the hub repos' dataset cards declare them, so types match an online load.
REPOS = [
    Repo(
        "Rowan/hellaswag",
        Features(
            ind=Value("int32"),
            activity_label=STRING,
            ctx_a=STRING,
            ctx_b=STRING,
            ctx=STRING,
            endings=List(STRING),
            source_id=STRING,
            split=STRING,
            split_type=STRING,
            label=STRING,
        ),
        {"default": {"validation": "hellaswag/validation.jsonl"}},
        placeholders={
            "train": {
                "ind": -1,
                "activity_label": MISSING,
                "ctx_a": MISSING,
                "ctx_b": "",
                "ctx": MISSING,
                "endings": [MISSING] * 4,
                "source_id": MISSING,
                "split": "train",
                "split_type": MISSING,
                "label": "4",  # an int (process_docs), but no ending
            }
        },
    ),
    Repo(
        "regisss/math_qa",
        Features(
            Problem=STRING,
            Rationale=STRING,
            options=STRING,
            correct=STRING,
            annotated_formula=STRING,
            linear_formula=STRING,
            category=STRING,
        ),
        {"default": {"test": "mathqa/test.jsonl"}},
        placeholders={
            # math_qa is all strings; "correct" names none of a-e
            "train": dict.fromkeys(
                [
                    "Problem",
                    "Rationale",
                    "options",
                    "correct",
                    "annotated_formula",
                    "linear_formula",
                    "category",
                ],
                MISSING,
            )
        },
    ),
    Repo(
        "allenai/openbookqa",
        Features(
            id=STRING,
            question_stem=STRING,
            choices={"text": List(STRING), "label": List(STRING)},
            answerKey=STRING,
        ),
        {"main": {"test": "openbookqa/test.jsonl", "validation": "openbookqa/validation.jsonl"}},
        placeholders={
            "train": {
                "id": MISSING,
                "question_stem": MISSING,
                "choices": {"text": [MISSING] * 4, "label": ["A", "B", "C", "D"]},
                "answerKey": MISSING,  # none of the labels
            }
        },
    ),
    Repo(
        "cais/mmlu",
        Features(
            question=STRING,
            subject=STRING,
            choices=List(STRING),
            answer=ClassLabel(names=["A", "B", "C", "D"]),
        ),
        {
            "all": {
                "test": "mmlu/test.jsonl",
                "dev": "mmlu/dev.jsonl",
                "validation": "mmlu/validation.jsonl",
            }
        },
        split_by="subject",
    ),
    Repo(
        "openai/gsm8k",
        Features(question=STRING, answer=STRING),
        {"main": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}},
    ),
]


class Mirror(datasets.ArrowBasedBuilder):
    """Writes in-memory tables where an online load of ``repo_id``/``config_name`` caches them."""

    def __init__(self, *, tables: dict[str, pa.Table], features: Features, **kwargs: Any) -> None:
        self._tables = tables  # set first: the base __init__ already calls _info()
        self._features = features
        super().__init__(**kwargs)

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(features=self._features)

    def _split_generators(self, dl_manager: Any) -> list[datasets.SplitGenerator]:
        return [
            datasets.SplitGenerator(name=split, gen_kwargs={"split": split})
            for split in self._tables
        ]

    def _generate_tables(self, split: str) -> Iterator[tuple[Key, pa.Table]]:
        yield Key(0, 0), self._tables[split]


def read_jsonl(path: Path, features: Features) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as lines:  # not splitlines(): MMLU rows hold U+2028
        rows = [json.loads(line) for line in lines]
    for number, row in enumerate(rows, 1):
        if row.keys() != features.keys():  # from_pylist would silently null or drop a field
            raise ValueError(f"{path}:{number}: fields {sorted(row)}, expected {sorted(features)}")
    return rows


def source_hash(data_dir: Path, repo: Repo) -> str:
    """A commit-like id of what is written (the cache's <hash> folder): same data, same folder."""
    digest = hashlib.sha1(json.dumps(repo.placeholders, sort_keys=True).encode())
    for path in sorted({p for splits in repo.configs.values() for p in splits.values()}):
        digest.update((data_dir / path).read_bytes())
    return digest.hexdigest()


def config_rows(
    data_dir: Path, repo: Repo, subjects: list[str] | None
) -> Iterator[tuple[str, dict[str, str], dict[str, list[dict[str, Any]]]]]:
    """(config name, source file per split, rows per split) of every config written for ``repo``."""
    for config, files in repo.configs.items():
        rows = {split: read_jsonl(data_dir / path, repo.features) for split, path in files.items()}
        yield config, files, rows
        if repo.split_by is None:
            continue
        values = sorted({row[repo.split_by] for split_rows in rows.values() for row in split_rows})
        if unknown := sorted(set(subjects or ()) - set(values)):
            raise ValueError(f"{repo.repo_id}: no {repo.split_by} {unknown} in {data_dir}")
        for value in subjects or values:
            yield (
                value,
                files,
                {
                    split: [row for row in split_rows if row[repo.split_by] == value]
                    for split, split_rows in rows.items()
                },
            )


def write_config(
    cache_dir: Path,
    repo: Repo,
    config: str,
    splits: dict[str, list[dict[str, Any]]],
    commit: str,
) -> None:
    """Write ``splits`` (rows in ``repo.features``) as config ``config`` of ``repo.repo_id`` into
    the `datasets` cache ``cache_dir`` (HF_DATASETS_CACHE), under the <hash> folder ``commit``;
    a folder already written for the same commit is reused."""
    builder = Mirror(
        tables={
            split: pa.Table.from_pylist(split_rows, schema=repo.features.arrow_schema)
            for split, split_rows in splits.items()
        },
        features=repo.features,
        cache_dir=str(cache_dir),
        # As CachedDatasetModuleFactory names them, so the offline lookup finds this folder.
        dataset_name=repo.repo_id.split("/")[-1],
        repo_id=repo.repo_id,
        config_name=config,
        hash=commit,
    )
    builder.download_and_prepare()


def build(data_dir: Path, out: Path, mmlu_subjects: list[str] | None = None) -> dict[str, Any]:
    """Write every repo's configs under ``out/datasets`` and the manifest; returns the manifest."""
    cache_dir = out / "datasets"
    manifest: dict[str, Any] = {"data_dir": str(data_dir.resolve()), "datasets": {}}
    for repo in REPOS:
        commit = source_hash(data_dir, repo)
        for config, files, rows in config_rows(data_dir, repo, mmlu_subjects):
            splits = {**{split: [row] for split, row in repo.placeholders.items()}, **rows}
            write_config(cache_dir, repo, config, splits, commit)
            manifest["datasets"].setdefault(repo.repo_id, {})[config] = {
                split: {"rows": len(split_rows), "source": files.get(split, "placeholder")}
                for split, split_rows in splits.items()
            }
    write_atomically(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, required=True, help="the folder to use as HF_HOME")
    parser.add_argument(
        "--mmlu-subjects",
        type=lambda text: text.split(","),
        help="comma-separated cais/mmlu subject configs to write (default: all 57)",
    )
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    manifest = build(args.data_dir, args.out, args.mmlu_subjects)
    configs = sum(len(repo_configs) for repo_configs in manifest["datasets"].values())
    print(f"{configs} dataset configs; offline use:")
    print(f"export HF_DATASETS_CACHE={(args.out / 'datasets').resolve()} HF_HUB_OFFLINE=1")


if __name__ == "__main__":
    main()
