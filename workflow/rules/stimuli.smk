# Stimuli: the training split, the held-out split and the attacked stimulus set,
# each an NPZ of images + human feature-importance maps (see advalign.columns).

if SYNTHETIC:

    rule synthetic_data:
        output:
            train="results/data/train.npz",
            heldout="results/data/heldout.npz",
            stimuli="results/data/stimuli.npz",
            classes="results/data/classes.csv",
            manifest="results/data/stimuli_manifest.csv",
        params:
            spec=config["data"]["synthetic"],
            seed=config["seed"],
        log:
            "logs/data/synthetic_data.log",
        conda:
            "../../envs/torch.yaml"
        script:
            "../scripts/synthetic_data.py"

else:
    # Paper mode: stimuli drawn from the ClickMe shards (they carry the ImageNet
    # images); ImageNet folders indexed for the training of the derived models.
    from advalign.data.clickme import find_shards
    from advalign.data.imagenet import CLASS_TABLE_PATH

    PAPER = config["data"]["paper"]

    def clickme_shards(patterns):
        """Shard files of glob patterns; one that matches nothing is a one-line planning error."""
        try:
            return [str(p) for p in find_shards(PAPER["clickme"]["shard_dir"], patterns)]
        except PipelineError as exc:
            raise WorkflowError(str(exc)) from None

    # Globbed once at planning: training needs the shards only if a model is trained.
    CLICKME_TRAIN_SHARDS = (
        clickme_shards(PAPER["clickme"]["train_shards"]) if trained_models() else []
    )

    def clickme_train_shards():
        return CLICKME_TRAIN_SHARDS

    rule paper_stimuli:
        input:
            shards=clickme_shards(PAPER["clickme"]["stimulus_shards"]),
            class_table=str(CLASS_TABLE_PATH),
        output:
            stimuli="results/data/stimuli.npz",
            classes="results/data/classes.csv",
            manifest="results/data/stimuli_manifest.csv",
        params:
            spec=PAPER["stimuli"],
            seed=config["seed"],
            verify_crc=PAPER["clickme"]["verify_crc"],
        resources:
            gpu=job_resource("stimuli", "gpu", 0),
            runtime=job_resource("stimuli", "runtime", 30),
            mem_mb=job_resource("stimuli", "mem_mb", 4000),
        log:
            "logs/data/paper_stimuli.log",
        conda:
            "../../envs/torch.yaml"
        script:
            "../scripts/paper_stimuli.py"

    def imagenet_source(split):
        imagenet = PAPER["imagenet"]
        if split == "train":
            return {"root": imagenet["train_dir"], "labels": None}
        return {"root": imagenet["val_dir"], "labels": imagenet["val_labels"]}

    rule imagenet_index:
        # The image folders are params, not inputs: ImageNet never changes, and a
        # dry run must plan without it. A flat layout's label file is an input.
        input:
            labels=lambda wildcards: imagenet_source(wildcards.split)["labels"] or [],
        output:
            "results/data/imagenet_{split}.csv",
        params:
            source=lambda wildcards: imagenet_source(wildcards.split),
        wildcard_constraints:
            split="train|val",
        resources:
            gpu=job_resource("imagenet_index", "gpu", 0),
            runtime=job_resource("imagenet_index", "runtime", 30),
            mem_mb=job_resource("imagenet_index", "mem_mb", 4000),
        log:
            "logs/data/imagenet_index_{split}.log",
        conda:
            "../../envs/torch.yaml"
        script:
            "../scripts/imagenet_index.py"
