# Human feature alignment (advalign.human_alignment; Table S2's "Human Alignment (%)"): each
# model's own saliency scored against the human maps of the stimuli, as the released ClickMe
# evaluation scores it. One job per model on the paper (a GPU job, like an attack); on the
# synthetic benchmark one local job scores every model, since each takes under a second and a
# job's torch and timm imports would cost more than the scoring.

if SYNTHETIC:

    rule human_alignment:
        input:
            stimuli="results/data/stimuli.npz",
            weights=[model_weights(m) for m in MODELS],
        output:
            [f"results/human_alignment/{m}.csv" for m in MODELS],
        log:
            "logs/human_alignment/all_models.log",
        # Seconds of CPU for all the synthetic models together, like cue_reliance: no queue wait.
        localrule: True
        conda:
            "../../envs/torch.yaml"
        threads: config["attacks"]["threads"]
        params:
            code=code_version("human_alignment.py"),
            cpu_kernels=config["cpu_kernels"],
            models=[model_row(m) for m in MODELS],
            device=config["device"],
            batch_size=config["attacks"]["batch_size"],
        script:
            "../scripts/human_alignment.py"

else:

    rule human_alignment:
        input:
            stimuli="results/data/stimuli.npz",
            weights=lambda wildcards: model_weights(wildcards.model),
        output:
            "results/human_alignment/{model}.csv",
        log:
            "logs/human_alignment/{model}.log",
        conda:
            "../../envs/torch.yaml"
        threads: config["attacks"]["threads"]
        resources:
            gpu=job_resource("attack", "gpu", 1),
            runtime=job_resource("attack", "runtime", 30),
            mem_mb=job_resource("attack", "mem_mb", 4000),
        params:
            code=code_version("human_alignment.py"),
            cpu_kernels=config["cpu_kernels"],
            models=lambda wildcards: [model_row(wildcards.model)],
            device=config["device"],
            batch_size=config["attacks"]["batch_size"],
        script:
            "../scripts/human_alignment.py"
