"""Result integrity in the aggregate step, and the input checks made before any GPU job."""

from __future__ import annotations

import copy

import pytest

from ablate.aggregate import ResultError, aggregate, write_csv
from ablate.config import ConfigError
from ablate.download import check_architecture, check_thinking_switch, check_token
from conftest import FAKE_CONFIG as CONFIG
from conftest import write_unit


def test_delta_is_ablated_minus_baseline(results, tmp_path):
    frame = aggregate(CONFIG, "f", results)
    acc = frame[frame["metric"] == "acc"].set_index("layer")
    assert acc.loc[0, "delta"] == pytest.approx(0.25 - 0.75)
    assert acc.loc[1, "delta"] == pytest.approx(1.0 - 0.75)
    ce = frame[frame["metric"] == "acc_ce"].set_index("layer")
    assert ce.loc[0, "score"] == pytest.approx(0.75) and ce.loc[0, "baseline"] == pytest.approx(
        0.25
    )
    write_csv(frame, tmp_path / "a.csv")
    write_csv(aggregate(CONFIG, "f", results), tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_missing_unit_is_an_error_naming_the_file(results):
    (results / "m/t/layer1/results.json").unlink()
    with pytest.raises(ResultError, match=r"m/t/layer1/results.json: missing"):
        aggregate(CONFIG, "f", results)


def test_short_result_is_an_error(results):
    samples = results / "m/t/layer0/samples.jsonl"
    samples.write_text("\n".join(samples.read_text().splitlines()[:3]) + "\n")
    with pytest.raises(
        ResultError, match=r"layer0/samples.jsonl: 3 documents, lm-eval evaluated 4"
    ):
        aggregate(CONFIG, "f", results)


def test_result_with_fewer_documents_than_its_baseline(results):
    write_unit(results, "layer0", [0, 0, 1])
    with pytest.raises(ResultError, match=r"layer0/results.json: 3 documents, but the baseline"):
        aggregate(CONFIG, "f", results)


def test_mixed_model_revisions_are_refused_unless_allowed(results):
    write_unit(results, "layer1", [1, 1, 1, 1], model_revision="def")
    with pytest.raises(ResultError, match=r"provenance model_revision = 'def' differs"):
        aggregate(CONFIG, "f", results)
    allowed = copy.deepcopy(CONFIG) | {"allow_mixed_provenance": True}
    assert len(aggregate(allowed, "f", results)) == 4


def test_missing_token_for_a_gated_model(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no cached login either
    spec = {"repo_id": "meta-llama/Llama-3.1-8B", "gated": True}
    with pytest.raises(
        ConfigError, match=r"models.llama: meta-llama/Llama-3.1-8B is gated: .*HF_TOKEN"
    ):
        check_token("llama", spec)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    check_token("llama", spec)


def test_declared_shapes_and_thinking_switch_are_checked_against_the_checkpoint(embedded_dir):
    spec = {"num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "has_thinking": False}
    check_architecture("smollm2", spec, embedded_dir)
    check_thinking_switch("smollm2", spec, embedded_dir)
    with pytest.raises(
        ConfigError, match=r"models.smollm2.num_layers: config says 32, checkpoint has 30"
    ):
        check_architecture("smollm2", spec | {"num_layers": 32}, embedded_dir)
    with pytest.raises(
        ConfigError, match=r"models.smollm2.has_thinking: .* no enable_thinking switch"
    ):
        check_thinking_switch("smollm2", spec | {"has_thinking": True}, embedded_dir)


def test_a_unit_of_other_weights_than_its_baseline_is_refused(tmp_path):
    """The weights a result was computed from (a digest of the checkpoint's files) must be its
    baseline's, even under one revision string (a re-download, a checkpoint edited in place);
    results written before the digest was recorded are compared by revision alone."""
    from ablate.aggregate import ResultError, check_provenance

    provenance = {"model_revision": "abc", "task_versions": {}, "num_fewshot": None,
                  "limit": 4, "dtype": "float32", "packages": {}}  # fmt: skip
    base = {"provenance": provenance | {"model_files": "1111"}}
    unit = {"provenance": provenance | {"model_files": "2222"}}
    with pytest.raises(ResultError) as refused:
        check_provenance(tmp_path / "unit.json", unit, tmp_path / "base.json", base)
    assert "provenance model_files = '2222' differs from" in str(refused.value)
    check_provenance(tmp_path / "unit.json", base, tmp_path / "base.json", base)
    check_provenance(
        tmp_path / "unit.json", unit, tmp_path / "base.json", {"provenance": provenance}
    )
