# Training: standard models from scratch (embedded default), and the derived
# harmonized / control / robust models fine-tuned from their base model.


rule train:
    input:
        unpack(training_inputs),
    output:
        weights="results/models/{model}/weights.pt",
        metrics="results/models/{model}/metrics.json",
        history="results/models/{model}/history.csv",
    params:
        job=training_params,
    threads: config["training"]["threads"]
    resources:
        gpu=lambda wildcards: 0 if SYNTHETIC else 1,
        runtime=lambda wildcards: 60 if SYNTHETIC else 4320,
    log:
        "logs/train/{model}.log",
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/train.py"
