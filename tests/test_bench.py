"""The bench's worker runner: output never blocks a worker, and a failure points at its log."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from ablate.bench import SCENARIOS, compute_floor, proof_seconds, reduced, run_logged
from conftest import DATA_DIR

MIB = 2**20


def test_output_beyond_the_pipe_buffer_does_not_block(tmp_path: Path) -> None:
    # 1 MiB on stderr and some on stdout: 16x a pipe's 64 KiB buffer.
    argv = [sys.executable, "-c", f"import sys; sys.stderr.write('x' * {MIB}); print('done')"]
    log = tmp_path / "logs" / "layer0.log"
    result: list[tuple[float, int]] = []
    # A thread, so a regression fails the test instead of hanging the suite.
    thread = threading.Thread(target=lambda: result.append(run_logged(argv, log)), daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the worker blocked on its output"
    wall, peak_rss = result[0]
    assert wall > 0 and peak_rss > 0
    text = log.read_text()
    assert text.count("x") == MIB and "done" in text


def test_failure_names_the_log_and_its_tail(tmp_path: Path) -> None:
    code = "import sys; print('head' * 2000); sys.stderr.write('the real error'); sys.exit(3)"
    log = tmp_path / "worker.log"
    with pytest.raises(RuntimeError) as failure:
        run_logged([sys.executable, "-c", code], log)
    message = str(failure.value)
    assert str(log) in message and "(3)" in message
    assert message.endswith("the real error")
    assert message.count("head") < 1000  # only the tail, not the whole log


def test_reduced_scenarios_keep_their_kind_on_fewer_documents_and_units() -> None:
    hellaswag = SCENARIOS["hellaswag"]
    assert hellaswag.task["limit"] >= 200 and len(hellaswag.units) == 30
    assert hellaswag.time_target == 0.30  # 1.15x the floor of exact scoring (0.265)
    assert SCENARIOS["kv"].task["lm_eval_task"] == "kv_retrieval"  # 10 pairs a context
    small = reduced(hellaswag, 50, 8)
    assert small.task == hellaswag.task | {"limit": 50}
    assert small.units == ("layer0", "layer3", "layer7", "layer11", "layer15", "layer18",
                           "layer22", "layer26")  # fmt: skip
    assert reduced(hellaswag, None, None) == hellaswag


def test_the_floor_is_computed_from_the_real_requests(embedded_dir) -> None:
    """HellaSwag's floor: each context once for its four endings, and the shared prefix of a
    layer sweep; measured 0.265 on 100 documents, about the same on 20."""
    scenario = reduced(SCENARIOS["hellaswag"], 20, None)
    spec = {"model_dir": str(embedded_dir), "data_dir": str(DATA_DIR)}
    assert compute_floor(scenario, spec) == pytest.approx(0.265, abs=0.03)
    assert scenario.name.format(docs=scenario.task["limit"]).endswith("(20 docs), log-likelihood")
    assert compute_floor(SCENARIOS["generate"], spec) is None


def test_the_proof_share_reads_what_the_jobs_logged(tmp_path: Path) -> None:
    from ablate.backends.hf import PROOF_LOG

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "layer0..layer29.log").write_text(
        f"ablate.backends.hf: {PROOF_LOG} 30 units in 1.25 s\nother\n"
    )
    (tmp_path / "logs" / "head0.0.log").write_text(
        f"ablate.backends.hf: {PROOF_LOG} 1 units in 0.5 s\n"
    )
    assert proof_seconds(tmp_path) == pytest.approx(1.75)
    assert proof_seconds(tmp_path / "none") is None
