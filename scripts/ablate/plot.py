"""Figures as the paper draws them: per panel, the ablated score per unit (line, with the
unablated baseline dashed) above Δ = ablated − baseline (bars; negative = the unit mattered).

Beyond the paper: each Δ bar carries its paired 95% interval and is drawn faded unless it is
significant after the Holm correction; layer-skip figures get a third row with the unablated
model's layer-importance proxies and their Spearman correlation with −Δ.
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.colors import to_rgba

from ablate.ablations import axis_label, unit_name
from ablate.aggregate import harm

SCORE_COLOR, DELTA_COLOR = "tab:blue", "goldenrod"
FADED = 0.3  # bar opacity of a Δ that is not significant
SIGNIFICANCE_NOTE = "whiskers: 95% paired interval; faded: not significant (Holm, α = 0.05)"
PROXY_LABELS = {"block_influence": "block influence", "angular_distance": "angular distance"}
FLOOR_NOTE = "scores 0 unablated: the model cannot do this task, so no Δ can show"


def row_unit(row: pd.Series) -> str:
    head = None if pd.isna(row["head"]) else int(row["head"])
    return unit_name(row["ablation_kind"], int(row["layer"]), head, row["ablation"])


def findings(frame: pd.DataFrame) -> list[str]:
    """What a figure found, one line per panel and series, from its CSV: the baseline, how many
    units have a significant Δ (Holm) and the largest drop, or that the unablated model scores 0
    (a flat line at 0 is then the task's floor, not a finding)."""
    lines = []
    for (_panel, series), rows in frame.groupby(["panel", "series"], sort=False):
        prefix = f"{series} ({rows['metric'].iloc[0]})"
        baseline = rows["baseline"].iloc[0]
        if baseline == 0 and (rows["score"] == 0).all():
            lines.append(f"{prefix}: {FLOOR_NOTE}")
            continue
        significant = rows["significant"].fillna(False).astype(bool)
        worst = rows.loc[harm(rows).idxmax()]
        change = "drop" if worst["higher_is_better"] else "rise"
        lines.append(
            f"{prefix}: baseline {baseline:.3f}; {significant.sum()} of {len(rows)} units with a "
            f"significant Δ; largest {change} {row_unit(worst)}, Δ {worst['delta']:+.3f} "
            f"(p_holm {worst['p_holm']:.1g})"
        )
    return lines


DESCRIPTION = "Score per ablated unit (line, dashed = unablated baseline) above Δ = ablated − baseline (bars)."


def rst_text(text: str) -> str:
    """``text`` as one paragraph of reStructuredText that shows it literally: line breaks
    folded (no directive or block can start) and every character reST reads as markup escaped
    (config strings: titles, captions, series labels)."""
    return re.sub(r"([\\*`|_<>\[\]:])", r"\\\1", " ".join(text.split()))


def findings_rst(lines: list[str]) -> str:
    """The findings as a reStructuredText bullet list, each line shown as written."""
    return "".join(f"- {rst_text(line)}\n" for line in lines)


def caption_rst(figure_id: str, figure: dict, lines: list[str]) -> str:
    """The report's caption of a figure: its id and title, what it plots, its caption from the
    config, and its findings; the config's text shown as text, never as markup."""
    head = [
        f"{figure_id}: {figure['title']}.",
        DESCRIPTION,
        figure.get("caption", ""),
        "What it found:",
    ]
    return rst_text(" ".join(part for part in head if part)) + "\n\n" + findings_rst(lines)


def delta_bars(ax, data: pd.DataFrame, colors: dict[str, str]) -> None:
    """Dodged Δ bars per series with 95% interval whiskers; faded when not significant. Units
    plotted at one x (random removal draws) share a bar: their mean Δ, whiskers over all their
    intervals, significant if every one is."""
    width = 0.8 / len(colors)
    for index, (series, color) in enumerate(colors.items()):
        rows = (
            data[data["series"] == series]
            .groupby("x", as_index=False)
            .agg(delta=("delta", "mean"), ci_low=("ci_low", "min"), ci_high=("ci_high", "max"),
                 significant=("significant", "all"))
        )  # fmt: skip
        x = rows["x"] + (index - (len(colors) - 1) / 2) * width
        fill = [
            to_rgba(color, 1.0 if significant else FADED) for significant in rows["significant"]
        ]
        ax.bar(x, rows["delta"], width=width, color=fill, edgecolor=color, linewidth=0.4)
        whiskers = [rows["delta"] - rows["ci_low"], rows["ci_high"] - rows["delta"]]
        ax.errorbar(x, rows["delta"], yerr=whiskers, fmt="none", ecolor="black", elinewidth=0.5)
    ax.axhline(0, color="black", linewidth=0.6)


def proxy_lines(ax, data: pd.DataFrame) -> None:
    """The layer proxies of each series' model and task, ρ with −Δ in the legend."""
    for name, label in PROXY_LABELS.items():
        for series, rows in data.groupby("series", sort=False):
            rho = rows[f"spearman_{name}"].iloc[0]
            suffix = f" ({series})" if data["series"].nunique() > 1 else ""
            ax.plot(rows["x"], rows[name], marker=".", markersize=3, linewidth=1,
                    label=f"{label}{suffix}, ρ(−Δ) = {rho:.2f}")  # fmt: skip
    ax.legend(fontsize="x-small", frameon=False)


def log_axes(top, middle, data: pd.DataFrame) -> None:
    """Scores on a log axis, Δ on a symmetric log axis (linear up to the baseline) with at most
    about six decades labelled: one removed layer can multiply a perplexity by 10^6."""
    top.set_yscale("log")
    linear = max(1.0, float(data["baseline"].min()))
    middle.set_yscale("symlog", linthresh=linear)
    largest = float(max(data["ci_high"].abs().max(), data["delta"].abs().max(), linear))
    decades = range(math.ceil(math.log10(linear)), math.ceil(math.log10(largest)) + 1)
    stride = max(1, math.ceil(len(decades) / 6))
    middle.set_yticks([0, *(10.0**k for k in decades[::stride])])


def plot_figure(frame: pd.DataFrame, title: str, panel_titles: list[str], out_paths: list[Path]):
    # x is the head for head sweeps (one layer per panel), else the layer.
    frame = frame.assign(x=frame["head"].fillna(frame["layer"]).astype(int))
    panels = sorted(frame["panel"].unique())
    names = list(dict.fromkeys(frame["series"]))
    multi = len(names) > 1
    palette = sns.color_palette(n_colors=len(names)) if multi else [SCORE_COLOR]
    score_colors = dict(zip(names, palette, strict=True))
    delta_colors = score_colors if multi else {names[0]: DELTA_COLOR}
    with_proxies = frame["block_influence"].notna().any()
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(
        3 if with_proxies else 2, len(panels), figsize=(4.2 * len(panels), 6.4 if with_proxies else 4.6),
        sharex="col", squeeze=False, layout="constrained",
        gridspec_kw={"height_ratios": [3, 2, 1.6] if with_proxies else [3, 2]},
    )  # fmt: skip
    for column, panel in enumerate(panels):
        data = frame[frame["panel"] == panel]
        top, middle = axes[0, column], axes[1, column]
        sns.lineplot(
            data=data, x="x", y="score", hue="series", marker="o", markersize=3,
            palette=score_colors, ax=top, legend=multi and column == 0,
        )  # fmt: skip
        if multi and column == 0:  # one legend, where the lines leave room
            top.legend(fontsize="x-small", loc="best", title=None)
        for _, base in data.groupby("series", sort=False)["baseline"].first().items():
            top.axhline(base, color="grey", linestyle="--", linewidth=0.8)
        if not data["higher_is_better"].iloc[0]:  # perplexity: ablations multiply it
            log_axes(top, middle, data)
        delta_bars(middle, data, delta_colors)
        metric = data["metric"].iloc[0]
        name = metric.split(",")[0]  # the lm-eval filter goes in the title, not the axis
        top.set(title=panel_titles[panel] or metric, xlabel="", ylabel=name)
        bottom = middle
        if with_proxies:
            bottom = axes[2, column]
            proxy_lines(bottom, data[data["block_influence"].notna()])
            bottom.set(ylabel="proxy")
            middle.set(xlabel="")
        middle.set(ylabel=f"Δ {name}")
        middle.set_title(SIGNIFICANCE_NOTE, fontsize="x-small", color="dimgrey")
        bottom.set(xlabel=axis_label(data["ablation_kind"].iloc[0]))
    fig.suptitle(textwrap.fill(title, width=int(48 * len(panels))))
    caption = "\n".join(
        textwrap.fill(line, width=int(80 * len(panels))) for line in findings(frame)
    )
    fig.text(0.5, 0, caption, ha="center", va="top", fontsize="x-small", color="dimgrey")
    for path in out_paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(
            path, dpi=150, bbox_inches="tight",  # the findings caption lies below the axes
            metadata={"Software": None} if str(path).endswith(".png") else None,
        )  # fmt: skip
    plt.close(fig)
