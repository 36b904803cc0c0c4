"""One evaluation job as plain data: a model under a chunk of ablations, on one task.

Built by the workflow's evaluation rule (and by the benchmark) from the config; every backend
reads the same fields, and a job crosses into a backend's own interpreter as JSON.
"""

from __future__ import annotations

import dataclasses
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
        revision = re.sub(r"[^A-Za-z0-9_.=-]", "_", self.model_revision or "unknown")
        return str(self.cache_dir / revision / ablation.id)
