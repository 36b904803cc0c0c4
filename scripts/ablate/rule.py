"""What every Snakemake entry point does first."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def rule_log(log_path: str, offline: bool = False) -> Iterator[None]:
    """Send stdout/stderr to the rule's log; ``offline`` keeps the hub away (compute nodes)."""
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    with (
        open(log_path, "w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        yield
