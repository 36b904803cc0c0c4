"""Nothing silently dropped: a key given twice or a YAML syntax error stops the workflow and the
planner with one line naming the file and line; a corrupt result names its file and the fix; a
failing rule script leaves its traceback in its log; the profiles resume a killed run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ablate.aggregate import ResultError, aggregate
from ablate.config import ConfigError, load_config, load_config_file
from ablate.plan import main
from conftest import FAKE_CONFIG as CONFIG
from conftest import REPO

# Line 3 and line 7 both define fig5: YAML alone would keep the second.
DUPLICATE = """\
models: {}
figures:
  fig5:
    title: first
  fig6:
    title: other
  fig5:
    title: second
"""
# An unquoted ': ' in a value on line 4, column 14.
SYNTAX_ERROR = "models: {}\nfigures:\n  fig5: {title: a}\n  fig6: title: b\n"
SYNTAX_REASON = "4:14: mapping values are not allowed here"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def dry_run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """``snakemake -n`` in ``workdir`` (its config.yaml unless ``args`` name one)."""
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", *args, "--snakefile", str(REPO / "Snakefile"),
         "--directory", str(workdir), "--cores", "1"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip


def refused(result: subprocess.CompletedProcess) -> list[str]:
    """The lines of a run that stopped before building any job."""
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Building DAG" not in output
    return output.splitlines()


def test_duplicate_key_names_file_key_and_both_lines(tmp_path):
    path = write(tmp_path / "dup.yaml", DUPLICATE)
    expected = f"{path}: duplicate key 'fig5' (lines 3 and 7)"
    with pytest.raises(ConfigError) as error:
        load_config_file(path)
    assert str(error.value) == expected
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == expected


def test_syntax_error_names_file_line_and_column(tmp_path):
    path = write(tmp_path / "bad.yaml", SYNTAX_ERROR)
    with pytest.raises(ConfigError, match=f"^{path}:{SYNTAX_REASON}$"):
        load_config(path)
    # The planner: one line, no traceback.
    with pytest.raises(SystemExit) as exit_:
        main(["fig5", "--configfile", str(path)])
    assert exit_.value.code == f"config error: {path}:{SYNTAX_REASON}"


def test_shipped_configs_and_tab_indented_json_load(tmp_path):
    for path in ("config.yaml", "workflow/config/demo.yaml"):
        assert load_config_file(REPO / path)["figures"]
    # Snakemake reads JSON first, and tab indentation is valid JSON but no valid YAML.
    path = write(tmp_path / "config.json", '{\n\t"figures": {\n\t\t"fig5": {}\n\t}\n}\n')
    assert load_config_file(path) == {"figures": {"fig5": {}}}


@pytest.mark.slow
def test_workflow_refuses_duplicate_key_in_configfile(tmp_path):
    path = write(tmp_path / "dup.yaml", DUPLICATE)
    lines = refused(dry_run(tmp_path, "fig5", "--configfile", str(path)))
    assert f"config error: {path}: duplicate key 'fig5' (lines 3 and 7)" in lines


@pytest.mark.slow
def test_workflow_refuses_duplicate_key_and_syntax_error_in_default_config(tmp_path):
    path = write(tmp_path / "config.yaml", DUPLICATE)  # named as in the working directory
    lines = refused(dry_run(tmp_path, "fig5"))
    assert "config error: config.yaml: duplicate key 'fig5' (lines 3 and 7)" in lines
    write(path, SYNTAX_ERROR)
    assert f"config error: config.yaml:{SYNTAX_REASON}" in refused(dry_run(tmp_path, "fig5"))


@pytest.mark.slow
def test_profiles_load_and_rerun_incomplete_jobs(tmp_path):
    from snakemake.cli import parse_args

    for profile in ("profiles/local", "profiles/slurm"):
        _, args = parse_args(["--profile", str(REPO / profile)])
        assert args.rerun_incomplete and args.keep_going, profile
    result = dry_run(
        tmp_path, "fig5", "--configfile", str(REPO / "workflow/config/demo.yaml"),
        "--profile", str(REPO / "profiles/local"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


FIX = (
    "an incomplete evaluation output: delete {} and rerun "
    "(the request cache replays what was computed)"
)


def test_truncated_results_json_names_file_and_fix(results):
    path = results / "m/t/layer0/results.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(ResultError) as error:
        aggregate(CONFIG, "f", results)
    message = str(error.value)
    assert message.startswith(f"{path}: not valid JSON (")
    assert message.endswith(FIX.format(path.parent))


def test_truncated_samples_names_file_line_and_fix(results):
    path = results / "m/t/base/samples.jsonl"
    text = path.read_text()
    path.write_text(text[: text.rindex("{") + 10])  # the 4th line cut short
    with pytest.raises(ResultError) as error:
        aggregate(CONFIG, "f", results)
    message = str(error.value)
    assert message.startswith(f"{path}:4: not valid JSON (")
    assert message.endswith(FIX.format(path.parent))


def test_rule_log_keeps_the_traceback(tmp_path):
    log = tmp_path / "rule.log"
    script = (
        "from ablate.rule import rule_log\n"
        f"with rule_log({str(log)!r}):\n"
        "    print('loading the model')\n"
        "    raise RuntimeError('unit layer3 failed')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "scripts")},
    )
    assert result.returncode == 1  # the job still fails
    text = log.read_text()
    assert text.startswith("loading the model\nTraceback (most recent call last):\n")
    assert text.rstrip().endswith("RuntimeError: unit layer3 failed")
    assert "RuntimeError: unit layer3 failed" in result.stderr  # and the terminal shows it
