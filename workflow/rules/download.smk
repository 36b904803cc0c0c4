rule download_model:
    input:
        get_model_files,
    output:
        marker=MODEL_RECORD,
    log:
        "logs/download/{model}.log",
    conda:
        "../../envs/eval.yaml"
    params:
        spec=get_model_spec,
    script:
        "../../scripts/download_model.py"


rule prefetch_task:
    output:
        marker=TASK_RECORD,
    log:
        "logs/prefetch/{task}.log",
    conda:
        "../../envs/eval.yaml"
    params:
        task=get_task_spec,
        data_dir=config["data_dir"],
    script:
        "../../scripts/prefetch_task.py"
