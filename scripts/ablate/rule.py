"""What every Snakemake entry point does first."""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
from collections.abc import Iterator
from typing import TextIO


def job_logging(stream: TextIO) -> None:
    """Log to ``stream`` what a reader of a job's log needs: lm-eval's INFO (cache hits, task
    versions) and ours (one line per unit, progress with an ETA, sweep batches)."""
    logging.basicConfig(
        stream=stream,
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    logging.getLogger("lm_eval").setLevel(logging.INFO)
    logging.getLogger("ablate").setLevel(logging.INFO)


@contextlib.contextmanager
def rule_log(log_path: str, offline: bool = False) -> Iterator[None]:
    """Send stdout/stderr to the rule's log, line by line (``tail -f`` it); ``offline`` keeps the
    hub away (compute nodes). Progress bars are off (``TQDM_DISABLE``, read when tqdm is first
    imported, by this process and its children): a log gets plain lines, no ``\\r`` updates.

    A failure's traceback is written to the log too (Snakemake points the user there), and the
    exception re-raised so the job fails.
    """
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    with (
        open(log_path, "w", buffering=1) as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        job_logging(log)
        try:
            yield
        except BaseException:
            # Python prints it only after the redirect has ended: on the terminal alone.
            traceback.print_exc(file=log)
            raise
