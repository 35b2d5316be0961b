# Paper mode: pretrained timm weights, fetched once into a local cache where the
# network is (a localrule runs on the submitting host, e.g. the SLURM login
# node); attack jobs on compute nodes load strictly from the cache.

if not SYNTHETIC:
    from advalign.weights import check_zoo_timm_names, require_complete_cache

    from advalign.weights import checkpoint_inputs, is_url

    WEIGHTS_CACHE = config["data"]["paper"]["weights_cache"]
    CACHED_MODELS = [m for m in MODELS if not is_trained(m)]
    # Rows naming their own checkpoint are imported (no network); the others come from timm's hub.
    IMPORTED_MODELS = [m for m in CACHED_MODELS if ZOO_ROWS[m]["checkpoint"]]
    FETCHED_MODELS = [m for m in CACHED_MODELS if not ZOO_ROWS[m]["checkpoint"]]

    try:
        # An unknown architecture or pretrained tag is a planning error, not a job failure.
        # Checked on the PLANNING_HOST only, not again inside each cluster job (timm's import).
        if PLANNING_HOST:
            check_zoo_timm_names(
                (ZOO_ROWS[m] for m in CACHED_MODELS),
                source=ZOO.attrs["source"],
                cache=STATE_DIR / "timm-names-checked.txt",
            )
        # A checkpoint (or rename table) that is not there: say so now, naming the row.
        CHECKPOINT_INPUTS = {
            m: checkpoint_inputs(ZOO_ROWS[m], WEIGHTS_CACHE) for m in IMPORTED_MODELS
        }
        # Checkpoints published at a URL (the authors' released Keras models) are downloaded
        # by the local rule download_checkpoint into the cache's downloads folder.
        DOWNLOADS = {
            Path(CHECKPOINT_INPUTS[m]["checkpoint"]).name: m
            for m in IMPORTED_MODELS
            if is_url(ZOO_ROWS[m]["checkpoint"])
        }
        if not config["data"]["paper"]["fetch_weights"]:
            # No rule can make a missing file: say which, before any job starts.
            require_complete_cache(WEIGHTS_CACHE, FETCHED_MODELS)
            for name, m in DOWNLOADS.items():
                if not Path(CHECKPOINT_INPUTS[m]["checkpoint"]).is_file():
                    raise PipelineError(
                        f"{CHECKPOINT_INPUTS[m]['checkpoint']}: checkpoint of model '{m}' "
                        f"({ZOO_ROWS[m]['checkpoint']}) is not downloaded, and "
                        "data.paper.fetch_weights is false"
                    )
    except PipelineError as exc:
        raise WorkflowError(str(exc)) from None

    localrules:
        weights_cache,

    rule weights_cache:
        # Target: every cached file. `snakemake weights_cache --cores 1 --configfile config/paper.yaml`
        input:
            [model_weights(m) for m in CACHED_MODELS],

    localrules:
        import_weights,

    rule import_weights:
        # A zoo row's own checkpoint (a file, or one shipped in a package) converted to a
        # timm state dict in the cache: `checkpoint_keys` maps its names onto timm's.
        input:
            unpack(lambda wildcards: CHECKPOINT_INPUTS[wildcards.model]),
        output:
            f"{WEIGHTS_CACHE}/{{model}}.pth",
        log:
            "logs/weights/{model}.log",
        wildcard_constraints:
            model=(
                "|".join(map(re.escape, IMPORTED_MODELS))
                if IMPORTED_MODELS
                else "NO_MODELS"
            ),
        conda:
            "../../envs/torch.yaml"
        params:
            code=code_version("import_weights.py"),
            model=lambda wildcards: model_row(wildcards.model),
        script:
            "../scripts/import_weights.py"

    if config["data"]["paper"]["fetch_weights"]:

        localrules:
            download_checkpoint,

        rule download_checkpoint:
            # A zoo checkpoint given as a URL: resumable, retried, read in full, renamed
            # atomically; its sha256 is locked at the first fetch (advalign.weights).
            output:
                f"{WEIGHTS_CACHE}/downloads/{{name}}",
            log:
                "logs/weights/download_{name}.log",
            wildcard_constraints:
                name="|".join(map(re.escape, DOWNLOADS)) if DOWNLOADS else "NO_FILES",
            conda:
                "../../envs/torch.yaml"
            params:
                model=lambda wildcards: model_row(DOWNLOADS[wildcards.name]),
                fetch=config["data"]["paper"]["checkpoint_fetch"],
            script:
                "../scripts/download_checkpoint.py"

        localrules:
            fetch_weights,

        rule fetch_weights:
            output:
                f"{WEIGHTS_CACHE}/{{model}}.pth",
            log:
                "logs/weights/{model}.log",
            wildcard_constraints:
                model=(
                    "|".join(map(re.escape, FETCHED_MODELS))
                    if FETCHED_MODELS
                    else "NO_MODELS"
                ),
            conda:
                "../../envs/torch.yaml"
            # No code fingerprint: timm's weights do not depend on this package's code, and a
            # module edit must not re-download 263 models.
            params:
                model=lambda wildcards: model_row(wildcards.model),
            script:
                "../scripts/fetch_weights.py"
