# Stimuli: the training split, the held-out split and the attacked stimulus set,
# each an NPZ of images + human feature-importance maps (see advalign.columns).

if SYNTHETIC:

    rule synthetic_data:
        output:
            train="results/data/train.npz",
            heldout="results/data/heldout.npz",
            stimuli="results/data/stimuli.npz",
            conflict="results/data/conflict.npz",
            classes="results/data/classes.csv",
            manifest="results/data/stimuli_manifest.csv",
        log:
            "logs/data/synthetic_data.log",
        conda:
            "../../envs/torch.yaml"
        params:
            code=code_version("synthetic_data.py"),
            spec=config["data"]["synthetic"],
            seed=config["seed"],
        script:
            "../scripts/synthetic_data.py"

else:
    # Paper mode: stimuli drawn from the ClickMe shards (they carry the ImageNet
    # images); ImageNet folders indexed for the training of the derived models.
    from advalign.data.imagenet import CLASS_TABLE_PATH

    PAPER = config["data"]["paper"]

    if PAPER["photos"]:
        from advalign.data.photos import read_photo_table

        try:
            read_photo_table(
                PAPER["photos"]
            )  # a photo without a label etc.: a planning error
        except PipelineError as exc:
            raise WorkflowError(str(exc)) from None
        PHOTO_SHARD = f"{PAPER['clickme']['shard_dir']}/val-0.tfrecords"

        rule photo_shard:
            # Real photographs as a ClickMe-format shard; their maps are hand-drawn boxes.
            input:
                table=PAPER["photos"],
                photos=[str(p.path) for p in read_photo_table(PAPER["photos"])],
            output:
                shard=PHOTO_SHARD,
                manifest=f"{PAPER['clickme']['shard_dir']}/photos.csv",
            log:
                "logs/data/photo_shard.log",
            conda:
                "../../envs/torch.yaml"
            params:
                code=code_version("photo_shard.py"),
            script:
                "../scripts/photo_shard.py"

    localrules:
        clickme_shards,

    rule clickme_shards:
        # One split of the public ClickMe shards (advalign.data.fetch), on the submitting host
        # like the weights cache: downloaded from fetch.base_url (resumed, retried, every
        # record's CRC checked, renamed atomically) or, with base_url null, the shards placed
        # in shard_dir by hand; each shard's sha256 goes to {shard_dir}/{split}.lock.json.
        # No code fingerprint: a module edit must not re-verify gigabytes of shards.
        input:
            lambda wildcards: clickme_hand_placed(wildcards.split),
        output:
            "results/data/clickme_{split}.json",
        log:
            "logs/data/clickme_{split}.log",
        wildcard_constraints:
            split="val|train",
        conda:
            "../../envs/torch.yaml"
        params:
            shard_dir=PAPER["clickme"]["shard_dir"],
            base_url=PAPER["clickme"]["fetch"]["base_url"],
            shards=lambda wildcards: PAPER["clickme"]["fetch"][wildcards.split],
            patterns=lambda wildcards: PAPER["clickme"][
                "stimulus_shards" if wildcards.split == "val" else "train_shards"
            ],
        script:
            "../scripts/clickme_shards.py"

    rule paper_stimuli:
        input:
            shards=[PHOTO_SHARD] if PAPER["photos"] else [],
            manifest=[] if PAPER["photos"] else "results/data/clickme_val.json",
            class_table=str(CLASS_TABLE_PATH),
        output:
            stimuli="results/data/stimuli.npz",
            classes="results/data/classes.csv",
            manifest="results/data/stimuli_manifest.csv",
        log:
            "logs/data/paper_stimuli.log",
        conda:
            "../../envs/torch.yaml"
        resources:
            gpu=job_resource("stimuli", "gpu", 0),
            runtime=job_resource("stimuli", "runtime", 30),
            mem_mb=job_resource("stimuli", "mem_mb", 4000),
        params:
            code=code_version("paper_stimuli.py"),
            spec=PAPER["stimuli"],
            seed=config["seed"],
            verify_crc=PAPER["clickme"]["verify_crc"],
        script:
            "../scripts/paper_stimuli.py"

    rule imagenet_index:
        # The image folders are params, not inputs: ImageNet never changes, and a
        # dry run must plan without it. A flat layout's label file is an input.
        input:
            labels=lambda wildcards: imagenet_source(wildcards.split)["labels"] or [],
        output:
            "results/data/imagenet_{split}.csv",
        log:
            "logs/data/imagenet_index_{split}.log",
        wildcard_constraints:
            split="train|val",
        conda:
            "../../envs/torch.yaml"
        resources:
            gpu=job_resource("imagenet_index", "gpu", 0),
            runtime=job_resource("imagenet_index", "runtime", 30),
            mem_mb=job_resource("imagenet_index", "mem_mb", 4000),
        params:
            code=code_version("imagenet_index.py"),
            source=lambda wildcards: imagenet_source(wildcards.split),
        script:
            "../scripts/imagenet_index.py"
