"""Snakemake script: train one model (standard, harmonized, control or robust).

One process per GPU of the job (resources gpu / nodes): with more than one, train_model
re-launches itself under torchrun (advalign.distributed); otherwise it trains here.
"""

from advalign.stage import run


def main(smk):
    from advalign.data.shard_lock import verified_shards
    from advalign.training import train_model

    gpus = int(smk.resources.get("gpu", 0) or 0)
    nodes = int(smk.resources.get("nodes", 1) or 1)
    clickme = smk.input.get("clickme")  # paper: the fetch manifest of the ClickMe training shards
    clickme = verified_shards(clickme) if clickme else []
    train_model(
        smk.params.job,
        train_path=smk.input.train,
        heldout_path=smk.input.heldout,
        base_weights=smk.input.get("base_weights"),
        out_weights=smk.output.weights,
        out_metrics=smk.output.metrics,
        out_history=smk.output.history,
        clickme_shards=clickme,
        processes=max(1, gpus // nodes),
        nodes=nodes,
    )


run(snakemake, main)  # noqa: F821
