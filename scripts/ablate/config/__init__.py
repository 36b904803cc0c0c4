"""The workflow config: loading and its errors (:mod:`.load`, :mod:`.errors`), figures expanded
into runs and chunks (:mod:`.runs`), the checks across keys (:mod:`.checks`), task folders and
what prefetch_task recorded (:mod:`.tasks`). The names below are the package's interface."""

from ablate.config.checks import check_config, check_model_proofs, check_proof
from ablate.config.errors import ConfigError
from ablate.config.load import load_config, load_config_file, schema_error, validate_config
from ablate.config.runs import (
    Chunk,
    Run,
    evaluation_backends,
    evaluation_chunks,
    figure_evaluations,
    figure_runs,
    panel_series,
    series_ablation,
)
from ablate.config.tasks import (
    check_task_metrics,
    check_task_records,
    folder_task_names,
    resolve_task_files,
    task_folders,
    task_metric_requests,
    task_settings,
)

__all__ = [
    "Chunk",
    "ConfigError",
    "Run",
    "check_config",
    "check_model_proofs",
    "check_proof",
    "check_task_metrics",
    "check_task_records",
    "evaluation_backends",
    "evaluation_chunks",
    "figure_evaluations",
    "figure_runs",
    "folder_task_names",
    "load_config",
    "load_config_file",
    "panel_series",
    "resolve_task_files",
    "schema_error",
    "series_ablation",
    "task_folders",
    "task_metric_requests",
    "task_settings",
    "validate_config",
]
