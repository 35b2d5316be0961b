# Attention under attack (advalign.attention; a related paper's lens): Grad-CAM of each kept
# main-attack example against its clean image, and of the clean image against the human map.
# One job per model on the paper (a GPU job, like an attack); on the synthetic benchmark one
# local job for every model, like human_alignment: each takes under a second there.
from advalign.columns import MAIN_ATTACK

ATTENTION_MODELS = _planning(PLAN.attention_models)

if SYNTHETIC and ATTENTION_MODELS:

    rule attention:
        input:
            stimuli="results/data/stimuli.npz",
            weights=[model_weights(m) for m in ATTENTION_MODELS],
            tables=[
                f"results/attacks/{MAIN_ATTACK}/{m}.parquet" for m in ATTENTION_MODELS
            ],
            examples=[
                f"results/attacks/{MAIN_ATTACK}/{m}.npz" for m in ATTENTION_MODELS
            ],
        output:
            [f"results/attention/{m}.csv" for m in ATTENTION_MODELS],
        log:
            "logs/attention/all_models.log",
        localrule: True
        conda:
            "../../envs/torch.yaml"
        threads: config["attacks"]["threads"]
        params:
            code=code_version("attention.py"),
            cpu_kernels=config["cpu_kernels"],
            models=[model_row(m) for m in ATTENTION_MODELS],
            device=config["device"],
            batch_size=config["attacks"]["batch_size"],
        script:
            "../scripts/attention.py"

elif not SYNTHETIC:

    rule attention:
        input:
            stimuli="results/data/stimuli.npz",
            weights=lambda wildcards: model_weights(wildcards.model),
            tables=f"results/attacks/{MAIN_ATTACK}/{{model}}.parquet",
            examples=f"results/attacks/{MAIN_ATTACK}/{{model}}.npz",
        output:
            "results/attention/{model}.csv",
        log:
            "logs/attention/{model}.log",
        conda:
            "../../envs/torch.yaml"
        threads: config["attacks"]["threads"]
        resources:
            gpu=job_resource("attack", "gpu", 1),
            runtime=job_resource("attack", "runtime", 30),
            mem_mb=job_resource("attack", "mem_mb", 4000),
        params:
            code=code_version("attention.py"),
            cpu_kernels=config["cpu_kernels"],
            models=lambda wildcards: [model_row(wildcards.model)],
            device=config["device"],
            batch_size=config["attacks"]["batch_size"],
        script:
            "../scripts/attention.py"
