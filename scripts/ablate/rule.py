"""What every Snakemake entry point does first."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
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


@contextlib.contextmanager
def sole_writer(lock_path: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (beside the job's log) while the job runs, or
    exit with one line naming the live writer. A job whose Snakemake was killed (kill -9, a
    lost login) keeps running; its rerun must not write the same outputs, progress file and log
    at the same time. The lock dies with its process, so a killed job leaves none behind."""
    os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = json.loads(handle.read() or "{}")
            sys.exit(
                f"{lock_path}: this job is already running (pid {holder.get('pid')} on "
                f"{holder.get('host')} since {holder.get('since')}); wait for it to finish or "
                "kill it, then rerun"
            )
        handle.truncate(0)
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}))  # fmt: skip
        handle.flush()
        yield
