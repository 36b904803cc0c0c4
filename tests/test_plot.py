"""The figure's findings caption, and a figure rendered from a small CSV."""

from __future__ import annotations

import pandas as pd

from ablate.aggregate import COLUMNS
from ablate.plot import FLOOR_NOTE, findings, findings_rst, plot_figure


def figure_csv(
    baseline: float, deltas: list[float], significant: list[bool], higher_is_better: bool = True
) -> pd.DataFrame:
    rows = [
        {"figure": "figX", "panel": 0, "series": "SmolLM2", "model": "smollm2", "task": "t",
         "metric": "acc", "ablation_kind": "layer", "layer": layer, "head": None,
         "score": baseline + delta, "baseline": baseline, "delta": delta,
         "higher_is_better": higher_is_better, "ci_low": delta - 0.05,
         "ci_high": delta + 0.05, "p_holm": 0.001 if sig else 0.9, "significant": sig}
        for layer, (delta, sig) in enumerate(zip(deltas, significant, strict=True))
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=COLUMNS)


def test_findings_name_the_largest_significant_drop():
    frame = figure_csv(0.6, [-0.3, 0.02, -0.05], [True, False, False])
    assert findings(frame) == [
        "SmolLM2 (acc): baseline 0.600; 1 of 3 units with a significant Δ; largest drop layer 0, "
        "Δ -0.300 (p_holm 0.001)"
    ]


def test_findings_of_a_lower_is_better_metric_name_the_largest_rise():
    frame = figure_csv(20.0, [-0.5, 300.0, 4.0], [True, True, False], higher_is_better=False)
    assert findings(frame) == [
        "SmolLM2 (acc): baseline 20.000; 2 of 3 units with a significant Δ; largest rise layer 1, "
        "Δ +300.000 (p_holm 0.001)"
    ]


def test_findings_say_when_the_model_scores_zero():
    assert findings(figure_csv(0.0, [0.0, 0.0], [False, False])) == [f"SmolLM2 (acc): {FLOOR_NOTE}"]


def test_findings_render_in_the_report_caption_as_written():
    """The caption's reST (rendered by docutils, as Snakemake's report does) shows each line as
    the plot writes it, markup in a config's series label included."""
    from docutils.core import publish_parts

    frame = figure_csv(0.6, [-0.3, 0.02], [True, False])
    frame["series"] = "*R1* `x` |y| a_ [1]_ <b>:role:"
    [line] = findings(frame)
    html = publish_parts(findings_rst([line]), writer_name="html")["body"]
    assert html.count("<li>") == 1
    text = html.split("<li>")[1].split("</li>")[0].removeprefix("<p>").removesuffix("</p>")
    assert text == line.replace("<", "&lt;").replace(">", "&gt;")


def test_plot_writes_png_and_pdf(tmp_path):
    out = [tmp_path / "f.png", tmp_path / "f.pdf"]
    plot_figure(figure_csv(0.6, [-0.3, 0.02], [True, False]), "title", [""], out)
    assert all(path.stat().st_size > 1000 for path in out)


def test_config_text_reaches_the_caption_as_text():
    """A title with a line break and a raw-HTML directive, reST markup and a substitution: the
    caption renders them literally, as docutils renders Snakemake's captions (before, the
    directive became a live <script> and |sub| an error box)."""
    from docutils.core import publish_parts

    from ablate.plot import caption_rst

    title = "Layers\n\n.. raw:: html\n\n   <script>alert(1)</script>\n\n**bold** |sub|"
    figure = {"title": title, "caption": "See `this <http://x>`_ and [1]_."}
    rst = caption_rst("fig1", figure, ["SmolLM2 (acc): no significant Δ"])
    html = publish_parts(rst, writer_name="html")["body"]
    assert "<script>" not in html and "system-message" not in html and "<strong>" not in html
    text = html.split("<p>")[1].split("</p>")[0]
    shown = " ".join(title.split()).replace("<", "&lt;").replace(">", "&gt;")
    assert text.startswith(f"fig1: {shown}. Score per ablated unit")
    assert "See `this &lt;http://x&gt;`_ and [1]_. What it found:" in text
    assert html.count("<li>") == 1
