rule aggregate_figure:
    input:
        get_figure_results,
    output:
        csv="results/aggregate/{figure}.csv",
    log:
        "logs/aggregate/{figure}.log",
    conda:
        "../../envs/plot.yaml"
    params:
        config=config,
        results_dir="results/evaluate",
    script:
        "../../scripts/aggregate_figure.py"
