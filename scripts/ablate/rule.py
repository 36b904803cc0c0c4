"""What every Snakemake entry point does first."""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
from collections.abc import Iterator


@contextlib.contextmanager
def rule_log(log_path: str, offline: bool = False) -> Iterator[None]:
    """Send stdout/stderr to the rule's log; ``offline`` keeps the hub away (compute nodes).

    A failure's traceback is written to the log too (Snakemake points the user there), and the
    exception re-raised so the job fails.
    """
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    with (
        open(log_path, "w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        # lm-eval reports at INFO what a reader of the log needs (cache hits, task versions).
        logging.basicConfig(stream=log, level=logging.WARNING, force=True)
        logging.getLogger("lm_eval").setLevel(logging.INFO)
        try:
            yield
        except BaseException:
            # Python prints it only after the redirect has ended: on the terminal alone.
            traceback.print_exc(file=log)
            raise
