"""Broken files and unreachable models are named in one line with their fix, or repaired."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3

import pytest

from ablate import backends
from ablate.ablations import Ablation
from ablate.config import ConfigError
from ablate.download import download_model
from ablate.embedded import conversion_cache
from ablate.job import Job
from ablate.lm_eval_tasks import set_aside_corrupt_caches
from ablate.models import load_model
from ablate.sweep import ProgressFile
from conftest import DATA_DIR, SMOLLM2

TASK = {"lm_eval_task": "kv_retrieval_short", "protocol": "loglikelihood", "limit": 3,
        "batch_size": 4}  # fmt: skip


def test_unknown_hub_model_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as refusal:
        download_model("m", {"source": "hub", "repo_id": "nobody/no-such-model"}, tmp_path)
    message = str(refusal.value)
    assert message.startswith("models.m.repo_id: cannot fetch 'nobody/no-such-model': ")
    assert "HF_HUB_OFFLINE is set" in message and "\n" not in message


def test_a_local_folder_without_weights_is_refused_at_download(embedded_dir, tmp_path):
    folder = tmp_path / "weightless"
    folder.mkdir()
    shutil.copy(embedded_dir / "config.json", folder / "config.json")
    spec = {"source": "local", "path": str(folder), "num_layers": 30, "num_heads": 9,
            "num_kv_heads": 3}  # fmt: skip
    with pytest.raises(ConfigError) as refusal:
        download_model("mine", spec, tmp_path / "out")
    assert str(refusal.value) == (
        f"models.mine.path: {folder} has a config.json but no *.safetensors weights (save the "
        "model with save_pretrained, which writes them)"
    )
    assert not (tmp_path / "out" / "download.json").exists()


def test_a_conversion_killed_half_way_is_redone_and_then_linked(tmp_path, monkeypatch):
    """The embedded model is converted once per machine; a cached conversion without its
    completion marker (the job was killed) is converted again, and every later run links it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = conversion_cache(0.5, 0)
    cached.mkdir(parents=True)
    (cached / "model.safetensors").write_bytes(b"half")
    spec = SMOLLM2 | {"o_proj_noise": 0.5}
    download_model("a", spec, tmp_path / "a")
    download_model("b", spec, tmp_path / "b")
    weights = [folder / "model.safetensors" for folder in (cached, tmp_path / "a", tmp_path / "b")]
    assert len({path.stat().st_ino for path in weights}) == 1
    assert load_model(tmp_path / "b", {})[0].config.num_hidden_layers == 30


def test_truncated_checkpoint_names_the_file_and_the_fix(embedded_dir, tmp_path):
    copy = shutil.copytree(embedded_dir, tmp_path / "model")
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(
        RuntimeError, match=rf"^{weights}: unreadable checkpoint file .*; delete {copy} and rerun"
    ):
        load_model(copy, {})


def test_corrupt_request_cache_is_set_aside_and_recomputed(embedded_dir, tmp_path, caplog):
    job = Job(embedded_dir, {"dtype": "float32"}, TASK, DATA_DIR, cache_dir=tmp_path / "cache",
              prefix_reuse=False)  # fmt: skip
    units = [Ablation.parse(u) for u in ("base", "layer0")]
    backends.run(job, [(u, tmp_path / "first" / u.id) for u in units])
    database = next((tmp_path / "cache").rglob("base_rank*.db"))
    database.write_bytes(database.read_bytes()[:300])  # truncated
    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(database).execute("SELECT * FROM unnamed").fetchall()
    with caplog.at_level(logging.WARNING, logger="ablate"):
        backends.run(job, [(u, tmp_path / "second" / u.id) for u in units])
    assert f"{database}: request cache unreadable" in caplog.text
    assert database.with_suffix(".corrupt").exists()
    for unit in units:  # recomputed (base) or replayed (layer0): the same answers
        first, second = (
            (tmp_path / run / unit.id / "samples.jsonl").read_text() for run in ("first", "second")
        )
        assert [json.loads(line)["resps"] for line in first.splitlines()] == [
            json.loads(line)["resps"] for line in second.splitlines()
        ]


def test_a_healthy_cache_is_left_alone(tmp_path):
    database = tmp_path / "base_rank0.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE unnamed (key TEXT PRIMARY KEY, value BLOB)")
    set_aside_corrupt_caches(str(tmp_path / "base"))
    assert database.exists()


def test_deleted_progress_file_warns_once_and_keeps_recording(tmp_path, caplog):
    progress = ProgressFile(tmp_path / "sweep.jsonl")
    progress.append({"batch": 1})
    progress.path.unlink()
    with caplog.at_level(logging.WARNING, logger="ablate"):
        progress.append({"batch": 2})
        progress.append({"batch": 3})
    assert caplog.text.count("was deleted while the sweep ran") == 1
    assert ProgressFile(tmp_path / "sweep.jsonl").read() == [{"batch": 2}, {"batch": 3}]
