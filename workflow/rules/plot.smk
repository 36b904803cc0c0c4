rule plot_figure:
    input:
        csv=rules.aggregate_figure.output.csv,
    output:
        png=report(
            "results/figures/{figure}.png",
            caption="../report/figure.rst",
            category="Figures",
            labels={"figure": "{figure}"},
        ),
        pdf="results/figures/{figure}.pdf",
    log:
        "logs/plot/{figure}.log",
    conda:
        "../../envs/plot.yaml"
    params:
        figure=get_figure_spec,
    script:
        "../../scripts/plot_figure.py"
