rule plot_figure:
    input:
        csv=rules.aggregate_figure.output.csv,
    output:
        png=report(
            FIGURE_PNG,
            caption="../report/figure.rst",
            category="Figures",
            labels={"figure": "{figure}"},
        ),
        pdf=FIGURE_PDF,
        caption=FIGURE_CAPTION,
    log:
        "logs/plot/{figure}.log",
    conda:
        "../../envs/eval.yaml"
    params:
        figure=get_figure_spec,
    script:
        "../../scripts/plot_figure.py"
