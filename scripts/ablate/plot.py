"""Figures as the paper draws them: per panel, the ablated score per unit (line, with the
unablated baseline dashed) above Δ = ablated − baseline (bars; negative = the unit mattered)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

SCORE_COLOR, DELTA_COLOR = "tab:blue", "goldenrod"


def unit_axis_label(kind: str) -> str:
    return {"head": "head", "kv_group": "KV group"}.get(kind, "layer")


def plot_figure(frame: pd.DataFrame, title: str, panel_titles: list[str], out_paths: list[Path]):
    # x is the head for head sweeps (one layer per panel), else the layer.
    frame = frame.assign(x=frame["head"].fillna(frame["layer"]).astype(int))
    panels = sorted(frame["panel"].unique())
    multi = frame["series"].nunique() > 1
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(
        2, len(panels), figsize=(4.2 * len(panels), 4.6), sharex="col", squeeze=False,
        gridspec_kw={"height_ratios": [3, 2]}, layout="constrained",
    )  # fmt: skip
    for column, panel in enumerate(panels):
        data = frame[frame["panel"] == panel]
        top, bottom = axes[0, column], axes[1, column]
        palette = None if multi else [SCORE_COLOR]
        sns.lineplot(
            data=data, x="x", y="score", hue="series", marker="o", markersize=3,
            palette=palette, ax=top, legend=multi and column == 0,
        )  # fmt: skip
        for _, base in data.groupby("series", sort=False)["baseline"].first().items():
            top.axhline(base, color="grey", linestyle="--", linewidth=0.8)
        bar_palette = None if multi else [DELTA_COLOR]
        sns.barplot(
            data=data, x="x", y="delta", hue="series", palette=bar_palette, ax=bottom,
            native_scale=True, legend=False,
        )  # fmt: skip
        bottom.axhline(0, color="black", linewidth=0.6)
        metric = data["metric"].iloc[0]
        name = metric.split(",")[0]  # the lm-eval filter goes in the title, not the axis
        top.set(title=panel_titles[panel] or metric, xlabel="", ylabel=name)
        bottom.set(xlabel=unit_axis_label(data["ablation_kind"].iloc[0]), ylabel=f"Δ {name}")
    if multi:  # one legend for all panels, below them, where long series names fit
        handles, labels = axes[0, 0].get_legend_handles_labels()
        axes[0, 0].get_legend().remove()
        fig.legend(handles, labels, loc="outside lower center", frameon=False)
    fig.suptitle(textwrap.fill(title, width=int(48 * len(panels))))
    for path in out_paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(
            path, dpi=150, metadata={"Software": None} if str(path).endswith(".png") else None
        )
    plt.close(fig)
