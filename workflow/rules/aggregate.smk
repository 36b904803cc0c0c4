rule aggregate_figure:
    input:
        get_figure_results,
    output:
        csv=report(
            FIGURE_CSV,
            caption="../report/figure_data.rst",
            category="Figure data",
            labels={"figure": "{figure}"},
        ),
        provenance=report(
            FIGURE_PROVENANCE,
            caption="../report/provenance.rst",
            category="Provenance",
            labels={"figure": "{figure}"},
        ),
    log:
        "logs/aggregate/{figure}.log",
    conda:
        "../../envs/eval.yaml"
    params:
        config=get_figure_config,
        results_dir=EVALUATIONS,
    script:
        "../../scripts/aggregate_figure.py"


rule check_claims:
    input:
        # This figure's CSV and those of the figures its claims compare with (`than`).
        unpack(get_claim_csvs),
    output:
        csv=report(
            CLAIMS_CSV,
            caption="../report/claims.rst",
            category="Paper claims",
            labels={"figure": "{figure}"},
        ),
    log:
        "logs/claims/{figure}.log",
    conda:
        "../../envs/eval.yaml"
    params:
        claims=get_figure_claims,
        models=get_claim_models,
        # Layer count of each of those models: claims.yaml `depth` is a fraction of it.
        num_layers=get_claim_num_layers,
        # Query heads per KV group of each (claims.yaml statistic group_share).
        heads_per_group=get_claim_heads_per_group,
    script:
        "../../scripts/check_claims.py"
