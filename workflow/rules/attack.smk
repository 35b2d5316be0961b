# Attacks: one job per model x attack. Images are processed in resumable chunks
# kept in results/attacks/{attack}/{model}.chunks/ until the job completes.


rule attack:
    input:
        stimuli="results/data/stimuli.npz",
        weights=lambda wildcards: model_weights(wildcards.model),
    output:
        table="results/attacks/{attack}/{model}.parquet",
        examples="results/attacks/{attack}/{model}.npz",
    log:
        "logs/attacks/{attack}/{model}.log",
    conda:
        "../../envs/torch.yaml"
    threads: config["attacks"]["threads"]
    resources:
        gpu=job_resource("attack", "gpu", 1),
        runtime=job_resource("attack", "runtime", 30),
        mem_mb=job_resource("attack", "mem_mb", 4000),
    params:
        code=attack_code_version,
        job=attack_params,
    script:
        "../scripts/attack.py"
