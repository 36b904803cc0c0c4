"""One evaluation job as plain data: a model under a chunk of ablations, on one task.

Built by the workflow's evaluation rule (and by the benchmark) from the config; every backend
reads the same fields, and a job crosses into a backend's own interpreter as JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablate.ablations import Ablation
from ablate.io import write_atomically
from ablate.paths import DOWNLOAD_RECORD

PATHS = ("model_dir", "source_dir", "cache_dir")
# Model keys that change no evaluation (legend, planner, SLURM request): editing one reruns no job.
COSMETIC_MODEL_KEYS = ("label", "params_b", "gpus")


def evaluated_model(spec: dict[str, Any], backend: str = "hf") -> dict[str, Any]:
    """The model settings (config ``models.<id>``) that decide a job's answers, the one place
    that says so: rule params (a change reruns the job), the job's data and its request caches'
    key (:meth:`Job.computed_with`) all take them from here. ``gpus`` counts where the backend
    shards the model over them (vLLM's tensor parallelism), not on HF."""
    model = {key: value for key, value in spec.items() if key not in COSMETIC_MODEL_KEYS}
    if backend != "hf":
        model["gpus"] = spec["gpus"]
    return model


@dataclass(frozen=True)
class Job:
    """Everything one evaluation needs, as plain data from the workflow config."""

    model_dir: Path
    model: dict[str, Any]  # config: models.<id>
    task: dict[str, Any]  # config: tasks.<id>
    data_dir: str
    seed: int = 1234
    source_dir: Path | None = None  # o_proj replacement source checkpoint
    cache_dir: Path | None = None  # lm-eval request caches, one per (model settings, ablation)
    prefix_reuse: bool = True  # log-likelihood chunks share the layers below each ablation
    # The baseline also writes its contiguous blocks' distances: a proxy-ordered removal of the
    # same model and task picks its layers by them.
    block_distances: bool = False
    # The folders of lm-eval's registry that define a registered task (prefetch_task records
    # them): indexed instead of the whole registry.
    registry_folders: list[str] = dataclasses.field(default_factory=list)
    backend: str = "hf"  # a key of ablate.backends.BACKENDS
    backend_options: dict[str, Any] = dataclasses.field(
        default_factory=dict
    )  # evaluation.<backend>

    def to_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in fields.items()}

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> Job:
        return cls(**{k: Path(v) if k in PATHS and v else v for k, v in fields.items()})

    @property
    def model_revision(self) -> str | None:
        record = self.model_dir / DOWNLOAD_RECORD
        return json.loads(record.read_text()).get("commit") if record.exists() else None

    @property
    def model_files(self) -> str:
        """A digest of the checkpoint's files (names, sizes, modification times): the weights
        a result was computed from, which its baseline's must equal (ablate.aggregate)."""
        text = json.dumps(files_fingerprint(self.model_dir))
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def request_cache(self, ablation: Ablation) -> str | None:
        """lm-eval ``use_cache`` prefix: a resubmitted job replays what it already computed."""
        if self.cache_dir is None:
            return None
        return str(self._settings_cache() / ablation.id)

    def sweep_progress(
        self, ablations: list[Ablation], batch_size: int, max_length: int
    ) -> Path | None:
        """Where a prefix sweep of ``ablations`` keeps its finished batches until the job is done
        (:class:`ablate.sweep.PrefixSweep`), beside the request caches; named by what decides its
        batches and answers, so a changed chunk, task or batching never reads another's."""
        if self.cache_dir is None:
            return None
        units = [a.id for a in ablations]
        what = json.dumps([units, batch_size, max_length, self.task], sort_keys=True)
        digest = hashlib.blake2b(what.encode(), digest_size=6).hexdigest()
        return self._settings_cache() / f"sweep_{ablations[0].id}_{digest}.jsonl"

    def computed_with(self) -> dict[str, Any]:
        """Everything besides the requests that decides an answer: the model's settings (dtype,
        device, attention kernel, noise...), its files and the source's (a re-download under
        the same revision string included), the backend and its options, and the batching."""
        return {
            "model": self.model,
            "revision": self.model_revision,
            "files": files_fingerprint(self.model_dir),
            "source_files": files_fingerprint(self.source_dir) if self.source_dir else None,
            "backend": self.backend,
            "backend_options": self.backend_options,
            "batch_size": self.task.get("batch_size"),
            "max_length": self.task.get("max_length"),
        }

    def _settings_cache(self) -> Path:
        """The request caches of this job's settings: a folder named by the model revision and
        a digest of :meth:`computed_with`, which its ``computed_with.json`` records. Another
        setting never replays these answers; switching back finds them again."""
        assert self.cache_dir is not None
        settings = self.computed_with()
        text = json.dumps(settings, sort_keys=True, default=str)
        digest = hashlib.blake2b(text.encode(), digest_size=6).hexdigest()
        revision = re.sub(r"[^A-Za-z0-9_.=-]", "_", self.model_revision or "unknown")
        folder = self.cache_dir / f"{revision}-{digest}"
        record = folder / "computed_with.json"
        if not record.exists():
            folder.mkdir(parents=True, exist_ok=True)
            write_atomically(record, json.dumps(settings, sort_keys=True, indent=1, default=str))
        elif json.loads(record.read_text()) != json.loads(text):
            raise ValueError(
                f"{folder}: its answers were computed with other settings than this job's "
                f"(see {record.name}); delete the folder"
            )
        return folder


def files_fingerprint(checkpoint_dir: Path) -> list[tuple[str, int, int]]:
    """(name, bytes, modification time) of a checkpoint's config and weight files: changed
    files under an unchanged revision string change it."""
    folder = Path(checkpoint_dir)
    files = [*sorted(folder.glob("*.safetensors")), folder / "config.json"]
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
