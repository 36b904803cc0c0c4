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

PATHS = ("model_dir", "source_dir", "cache_dir")


@dataclass(frozen=True)
class Job:
    """Everything one evaluation needs, as plain data from the workflow config."""

    model_dir: Path
    model: dict[str, Any]  # config: models.<id>
    task: dict[str, Any]  # config: tasks.<id>
    data_dir: str
    seed: int = 1234
    source_dir: Path | None = None  # o_proj replacement source checkpoint
    cache_dir: Path | None = None  # lm-eval request caches, one per (model revision, ablation)
    prefix_reuse: bool = True  # log-likelihood chunks share the layers below each ablation
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
        record = self.model_dir / "download.json"
        return json.loads(record.read_text()).get("commit") if record.exists() else None

    def request_cache(self, ablation: Ablation) -> str | None:
        """lm-eval ``use_cache`` prefix: a resubmitted job replays what it already computed."""
        if self.cache_dir is None:
            return None
        return str(self._revision_cache() / ablation.id)

    def sweep_progress(
        self, ablations: list[Ablation], batch_size: int, max_length: int
    ) -> Path | None:
        """Where a prefix sweep of ``ablations`` keeps its finished batches until the job is done
        (:class:`ablate.sweep.PrefixSweep`), beside the request caches; named by what decides its
        batches and answers, so a changed chunk, task, model setting or batching never reads
        another's."""
        if self.cache_dir is None:
            return None
        units = [a.id for a in ablations]
        what = json.dumps([units, batch_size, max_length, self.model, self.task], sort_keys=True)
        digest = hashlib.blake2b(what.encode(), digest_size=6).hexdigest()
        return self._revision_cache() / f"sweep_{ablations[0].id}_{digest}.jsonl"

    def _revision_cache(self) -> Path:
        assert self.cache_dir is not None
        revision = re.sub(r"[^A-Za-z0-9_.=-]", "_", self.model_revision or "unknown")
        return self.cache_dir / revision
