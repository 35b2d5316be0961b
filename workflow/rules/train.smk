# Training: standard models from scratch (embedded default), and the derived
# harmonized / control / robust models fine-tuned from their base model.


rule train:
    input:
        unpack(training_inputs),
    output:
        weights="results/models/{model}/weights.pt",
        metrics="results/models/{model}/metrics.json",
        history="results/models/{model}/history.csv",
    log:
        "logs/train/{model}.log",
    conda:
        "../../envs/torch.yaml"
    threads: config["training"]["threads"]
    resources:
        gpu=job_resource("train", "gpu", 0),
        runtime=job_resource("train", "runtime", 60),
        mem_mb=job_resource("train", "mem_mb", 4000),
    params:
        job=training_params,
    script:
        "../scripts/train.py"
