"""The DAG end to end on a tiny config: every output exists and is well-formed,
and a second plan right after a complete run has nothing to do."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from advalign.figure_registry import figure_names, get_figure
from advalign import columns
from conftest import snakemake

pytestmark = pytest.mark.slow


def test_every_figure_is_a_real_image(tiny_run):
    table = pd.read_csv(tiny_run.path("results/stats/model_attack_table.csv"))
    ran = set(table["attack"])
    for fig in figure_names():
        png = tiny_run.path(f"figures/{fig}.png")
        pdf = tiny_run.path(f"figures/{fig}.pdf")
        # A figure whose attack is not enabled (figM1 needs fmn_l2), or whose measure did not run
        # (Figs. A1, A2 need autoattack), is a notice saying so: smaller.
        spec = get_figure(fig).spec
        unmeasured = any(table[axis.value].isna().all() for axis in (getattr(spec, "x", None), getattr(spec, "y", None))
                         if axis is not None)  # fmt: skip
        notice = not set(get_figure(fig).attacks) <= ran or unmeasured
        with Image.open(png) as image:
            width, height = image.size
            assert width >= 400 and height >= (150 if notice else 300), f"{fig}.png is {width}x{height}"
            pixels = np.asarray(image.convert("L"))
            assert pixels.std() > 5, f"{fig}.png is blank"
        assert pdf.read_bytes()[:5] == b"%PDF-", f"{fig}.pdf is not a PDF"


def test_tables_follow_their_contracts(tiny_run):
    expected = {
        "table_s1": columns.TABLE_S1_COLUMNS,
        "table_s2": columns.TABLE_S2_COLUMNS,
        "claims": columns.CLAIM_COLUMNS,
    }
    for name, cols in expected.items():
        table = pd.read_csv(tiny_run.path(f"results/tables/{name}.csv"))
        assert list(table.columns)[: len(cols)] == list(cols), name
        assert len(table) > 0, name
        markdown = tiny_run.path(f"results/tables/{name}.md").read_text()
        assert markdown.count("|") > 2 * len(cols), name
    claims = pd.read_csv(tiny_run.path("results/tables/claims.csv"))
    beyond = claims["source"] == "beyond the paper"  # the validation and reported rows: no paper value
    related = claims["source"].str.startswith("related paper")  # the related papers' lenses
    assert claims.loc[~beyond & ~related, "paper_value"].notna().all() and claims.loc[beyond, "paper_value"].isna().all()
    # validation: part reliance vs alignment and vs accuracy; reported: vs human feature alignment (2),
    # vs clean Grad-CAM attention, and the harmonized models' attention against their base's.
    assert claims.loc[beyond, "claim"].str.split(":").str[0].value_counts().to_dict() == {"validation": 2,
                                                                                          "reported": 4}  # fmt: skip
    assert related.sum() == 4 and claims.loc[related, "note"].str.startswith("not the regenerated paper's claim").all()
    reported = claims[claims["claim"].str.startswith("reported:")]
    assert reported["agrees"].isna().all() and reported["recomputed_value"].notna().all()
    reliance = pd.read_csv(tiny_run.path("results/stats/cue_reliance.csv"))
    assert list(reliance.columns) == list(columns.RELIANCE_COLUMNS) and reliance["model"].is_unique


def test_every_model_has_its_human_feature_alignment(tiny_run):
    """Table S2's measure, per image for every model, summarised in the model table and Table S2."""
    from advalign.human_alignment import HUMAN_SPEARMAN_CEILING

    table = pd.read_csv(tiny_run.path("results/stats/model_attack_table.csv"))
    stimuli = np.load(tiny_run.path("results/data/stimuli.npz"))
    for model in table["model"].unique():
        scores = pd.read_csv(tiny_run.path(f"results/human_alignment/{model}.csv"))
        assert list(scores.columns) == list(columns.HUMAN_ALIGNMENT_COLUMNS)
        assert scores["image_id"].tolist() == stimuli["ids"][stimuli["has_map"]].tolist()
        assert scores["spearman"].between(-1, 1).all() and scores[["dice", "iou"]].stack().between(0, 1).all()
        rows = table[table["model"] == model]
        expected = 100 * scores["spearman"].mean() / HUMAN_SPEARMAN_CEILING
        assert np.allclose(rows["human_alignment"], expected) and (rows["n_human"] == len(scores)).all()
    s2 = pd.read_csv(tiny_run.path("results/tables/table_s2.csv"))
    assert s2["human_alignment"].notna().all() and s2["base_human_alignment"].notna().all()


def test_model_table_covers_every_model_and_attack(tiny_run):
    from advalign.config import load_config
    from advalign.zoo import load_zoo

    config = load_config(tiny_run.path("tests/configs/tiny.yaml"))
    table = pd.read_csv(tiny_run.path("results/stats/model_attack_table.csv"))
    assert list(table.columns)[: len(columns.MODEL_ATTACK_COLUMNS)] == list(columns.MODEL_ATTACK_COLUMNS)
    models = set(load_zoo(config)["model"])
    pgd = table[table["attack"] == "pgd_l2"]
    assert set(pgd["model"]) == models
    assert set(table["attack"]) == set(config["attacks"]["enabled"])
    assert (pgd["accuracy"].between(0, 100)).all()
    assert (pgd["n_attacked"] == pgd["n_success"] + pgd["n_failed"]).all()
    attacked = pgd[pgd["n_success"] > 0]
    assert (attacked["tolerance"] > 0).all()
    assert attacked["alignment"].between(-1, 1).all()


def test_attack_results_follow_their_contract(tiny_run):
    stimuli = np.load(tiny_run.path("results/data/stimuli.npz"))
    for path in sorted(tiny_run.path("results/attacks").glob("*/*.parquet")):
        table = pd.read_parquet(path)
        assert list(table.columns) == list(columns.ATTACK_COLUMNS), path
        assert table["image_id"].is_unique
        assert set(table["image_id"]) <= set(stimuli["ids"])
        success = table[table["success"]]
        assert (success["adv_pred"] != success["label"]).all(), path
        assert (success["l2"] > 0).all() and (success["linf"] > 0).all()
        assert table.loc[~table["attacked"], "success"].eq(False).all()
        examples = np.load(path.with_suffix(".npz"))
        assert set(columns.EXAMPLE_ARRAYS) <= set(examples.files), path
        assert examples["perturbations"].shape[-1] == 3
    assert not list(tiny_run.path("results/attacks").glob("*/*.chunks")), "resume chunks left behind"


def test_tests_and_training_outputs(tiny_run):
    tests = json.loads(tiny_run.path("results/stats/tests.json").read_text())
    assert tests and all(set(columns.TEST_KEYS) <= set(t) for t in tests)
    for metrics in tiny_run.path("results/models").glob("*/metrics.json"):
        values = json.loads(metrics.read_text())
        assert set(columns.TRAIN_METRICS_KEYS) <= set(values), metrics
        assert 0.0 <= values["heldout_accuracy"] <= 1.0


def test_every_job_logged(tiny_run):
    logs = list(tiny_run.path("logs").rglob("*.log"))
    assert logs and all(log.stat().st_size > 0 for log in logs)


def test_second_plan_has_nothing_to_do(tiny_run):
    proc = snakemake(tiny_run.workdir, "-n", *tiny_run.config_args())
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]


def test_every_job_ran_in_the_job_server(tiny_run):
    """A local run's jobs run in forks of its job server (advalign.jobserver), each exiting 0."""
    log = tiny_run.path(".snakemake/advalign/job-server.log").read_text()
    started = re.findall(r"worker (\d+): tmp\w+\.(\w+)\.py$", log, flags=re.M)
    exits = dict(re.findall(r"worker (\d+): exit (-?\d+)$", log, flags=re.M))
    jobs = list(tiny_run.path("logs").rglob("*.log"))  # every job of a script rule has its log
    assert len(started) == len(jobs) > 30
    assert {exits[pid] for pid, _ in started} == {"0"}
    assert "note: job server" not in tiny_run.log


def test_jobs_write_the_same_bytes_without_the_job_server(tiny_run, tmp_path):
    """job_server: false runs each job in its own process; a model's training and its attacks
    then write exactly the files the server's workers wrote."""
    workdir = tmp_path / "repo"
    shutil.copytree(tiny_run.workdir, workdir, symlinks=True)
    model = "resnet_demo"
    files = [f"results/models/{model}/weights.pt"] + [
        str(p.relative_to(workdir)) for p in sorted(workdir.glob(f"results/attacks/*/{model}.*"))
    ]
    assert len(files) >= 7
    served = {f: (workdir / f).read_bytes() for f in files}
    server_log = (workdir / ".snakemake/advalign/job-server.log").read_text()
    for f in files:
        (workdir / f).unlink()
    snakemake(workdir, *files, "--cores", "2", *tiny_run.config_args(), "--config", "job_server=False")
    assert {f: (workdir / f).read_bytes() for f in files} == served
    assert (workdir / ".snakemake/advalign/job-server.log").read_text() == server_log  # no server this time
