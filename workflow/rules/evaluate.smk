# One job per chunk of `evaluation.units_per_job` ablation units of one (model, task): the model
# is loaded once per job (backend vllm: one engine per job, run in the vLLM environment).
# Rules are generated from the config, one per chunk (ablate.config).
for chunk in evaluation_chunks(config):

    rule:
        name:
            chunk.name
        input:
            **chunk_inputs(chunk),
        output:
            **chunk_outputs(chunk),
        log:
            EVALUATION_LOG.format(model=chunk.model, task=chunk.task, label=chunk.label),
        benchmark:
            BENCHMARK.format(model=chunk.model, task=chunk.task, label=chunk.label)
        conda:
            chunk_env(chunk)
        threads: 1
        resources:
            gpu=config["models"][chunk.model]["gpus"],
            mem_mb=chunk_mem_mb(chunk),
            runtime=chunk_runtime(chunk),
        params:
            job=evaluation_job(chunk),
            ablations=list(chunk.ids),
            # Outlives a killed job on purpose: the resubmission replays finished requests.
            cache_dir=REQUEST_CACHES.format(model=chunk.model, task=chunk.task),
        script:
            "../../scripts/evaluate_ablation.py"
