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
