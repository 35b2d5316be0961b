# Attacks: one job per model x attack. Images are processed in resumable chunks
# kept in results/attacks/{attack}/{model}.chunks/ until the job completes.


rule attack:
    input:
        stimuli="results/data/stimuli.npz",
        weights=lambda wildcards: model_weights(wildcards.model),
    output:
        table="results/attacks/{attack}/{model}.parquet",
        examples="results/attacks/{attack}/{model}.npz",
    params:
        job=attack_params,
    threads: config["attacks"]["threads"]
    resources:
        gpu=lambda wildcards: 0 if SYNTHETIC else 1,
        runtime=lambda wildcards: 30 if SYNTHETIC else 240,
    log:
        "logs/attacks/{attack}/{model}.log",
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/attack.py"
