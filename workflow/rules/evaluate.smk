rule evaluate_ablation:
    input:
        unpack(get_evaluation_models),
        task=rules.prefetch_task.output.marker,
    output:
        results="results/evaluate/{model}/{task}/{ablation}/results.json",
        samples="results/evaluate/{model}/{task}/{ablation}/samples.jsonl",
    log:
        "logs/evaluate/{model}/{task}/{ablation}.log",
    benchmark:
        "benchmarks/evaluate/{model}/{task}/{ablation}.tsv"
    conda:
        "../../envs/eval.yaml"
    threads: 1
    resources:
        gpu=get_eval_resources_gpu,
        mem_mb=get_eval_resources_mem_mb,
        runtime=get_eval_runtime,
    params:
        job=get_evaluation_job,
        # Outlives a killed job on purpose: the resubmission replays finished requests.
        cache_dir="results/cache/{model}/{task}",
    script:
        "../../scripts/evaluate_ablation.py"
