# Training: standard models from scratch (embedded default), and the derived
# harmonized / control / robust models, from their base model (advalign.training).
# A job with gpu=G runs G DistributedDataParallel processes through torchrun, on
# `nodes` nodes (advalign.distributed); it checkpoints next to its outputs and
# resumes from there when rerun after a kill or preemption.


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
    threads: train_threads()
    resources:
        gpu=job_resource("train", "gpu", 1),
        nodes=job_resource("train", "nodes", 1),
        runtime=job_resource("train", "runtime", 60),
        mem_mb=job_resource("train", "mem_mb", 4000),
        mpi=train_multinode("mpi"),
        tasks_per_node=train_multinode("tasks_per_node"),
        cpus_per_task=train_multinode("cpus_per_task"),
    params:
        code=code_version("train.py"),
        job=training_params,
    script:
        "../scripts/train.py"
