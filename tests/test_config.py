"""The config schema: defaults are filled, and every kind of mistake is one clear line."""

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from advalign.config import load_config, validate_config
from advalign.io import PipelineError
from advalign.zoo import load_zoo

REPO = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((REPO / "config/config.yaml").read_text())


def _validate(cfg):
    cfg = copy.deepcopy(cfg)
    if "zoo" in cfg:
        cfg["zoo"]["table"] = str(REPO / cfg["zoo"]["table"])
    return validate_config(cfg, source="test.yaml")


def test_default_config_is_valid_and_filled():
    cfg = _validate(DEFAULT)
    assert cfg["attacks"]["pgd_l2"]["steps"] >= 1
    assert cfg["attacks"]["pgd_l2"]["step_rule"] in ("relative", "fixed")
    assert cfg["training"]["harmonizer"]["levels"] == 5
    assert set(cfg["attacks"]["enabled"]) <= {"pgd_l2", "pgd_linf", "cw_l2", "autoattack"}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["attacks"]["pgd_l2"].update(stpes=3), "attacks.pgd_l2: unknown key 'stpes'"),
        (lambda c: c.update(sed=1), "<top level>: unknown key 'sed'"),
        (lambda c: c.update(cpu_kernels="avx512"), "cpu_kernels: 'avx512' is not one of ['avx2', 'native']"),
        (lambda c: c["training"].update(batch_size=0), "training.batch_size: 0 is less than the minimum of 1"),
        (lambda c: c["data"].update(kind="imagenet"), "data.kind: 'imagenet' is not one of"),
        (lambda c: c["attacks"].update(enabled=["pgd_l3"]), "attacks.enabled.0: 'pgd_l3' is not one of"),
        (lambda c: c.pop("zoo"), "'zoo' is a required property"),
        (lambda c: c["attacks"]["pgd_l2"].update(eps_max="ten"), "attacks.pgd_l2.eps_max: 'ten' is not of type 'number'"),
    ],
)
def test_bad_config_is_one_clear_line(mutate, message):
    cfg = copy.deepcopy(DEFAULT)
    mutate(cfg)
    with pytest.raises(PipelineError) as info:
        _validate(cfg)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert text.startswith("test.yaml:")


def test_derived_model_must_name_a_known_base(tmp_path):
    cfg = copy.deepcopy(DEFAULT)
    cfg["zoo"]["derived"] = [{"model": "x_harmonized", "training": "harmonized", "base_model": "no_such_model"}]
    with pytest.raises(PipelineError, match="base_model 'no_such_model' is not in"):
        load_zoo(_validate(cfg))


def test_robust_model_needs_eps():
    cfg = copy.deepcopy(DEFAULT)
    base = load_zoo(_validate(DEFAULT))["model"].iloc[0]
    cfg["zoo"]["derived"] = [{"model": "r", "training": "robust", "base_model": base}]
    with pytest.raises(PipelineError, match="robust models need robust_eps"):
        _validate(cfg)


def test_zoo_table_errors(tmp_path):
    table = tmp_path / "zoo.csv"
    table.write_text("# a comment line\nmodel,timm_name,arch_class,family\n\nm1,resnet18,RNN,ResNet\n")
    cfg = copy.deepcopy(DEFAULT)
    cfg["zoo"] = {"table": str(table)}
    # The file's own line number: comments and blank lines count.
    with pytest.raises(PipelineError, match=r"line 4 \(m1\): arch_class 'RNN' is not one of CNN, ViT, hybrid"):
        load_zoo(validate_config(cfg))
    table.write_text("model,timm_name,arch_class,famly\nm1,resnet18,CNN,ResNet\n")
    with pytest.raises(PipelineError, match="missing column"):
        load_zoo(validate_config(cfg))
    table.write_text('model,timm_name,timm_kwargs,arch_class,family\nm1,resnet18,{"a": 1, "b": 2},CNN,ResNet\n')
    with pytest.raises(PipelineError, match="line 2 has 6 fields, the header 5"), warnings.catch_warnings():
        warnings.simplefilter("error")  # the one line only, no pandas warning before it
        load_zoo(validate_config(cfg))
    with pytest.raises(PipelineError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_snakemake_reports_a_config_typo_in_one_line(tmp_path):
    """A typo in a config key stops planning with the key named, before any job runs."""
    bad = copy.deepcopy(DEFAULT)
    bad["attacks"]["pgd_l2"]["stpes"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "-n", "--configfile", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "attacks.pgd_l2: unknown key 'stpes'" in proc.stdout + proc.stderr


def test_cli_check_config():
    from advalign.cli import main

    assert main(["check-config", str(REPO / "config/config.yaml")]) == 0
    assert main(["check-config", "/nonexistent.yaml"]) == 1


BAD_OVERLAYS = {
    "misspelt model": ({"attacks": {"overrides": {"resnet_dmeo": {"pgd_l2": {"steps": 5}}}}},
                       "attacks.overrides.resnet_dmeo: no model 'resnet_dmeo' in the zoo (closest: resnet_demo"),
    "misspelt CW key": ({"attacks": {"overrides": {"resnet_demo": {"cw_l2": {"stpes": 5}}}}},
                        "attacks.overrides.resnet_demo.cw_l2: unknown key 'stpes'"),
    "misspelt PGD key": ({"attacks": {"overrides": {"resnet_demo": {"pgd_l2": {"stpes": 5}}}}},
                         "attacks.overrides.resnet_demo.pgd_l2: unknown key 'stpes'"),
    "wrong type": ({"attacks": {"overrides": {"resnet_demo": {"pgd_l2": {"steps": "five"}}}}},
                   "attacks.overrides.resnet_demo.pgd_l2.steps: 'five' is not of type 'integer'"),
    "unordered bounds": ({"attacks": {"pgd_l2": {"eps_min": 20.0}}},
                         "attacks.pgd_l2: search bounds need 0 < eps_min < eps_max, got 20.0 and 10.0"),
    "unordered override": ({"attacks": {"overrides": {"vit_demo": {"pgd_linf": {"eps_max": 1e-7}}}}},
                           "attacks.overrides.vit_demo.pgd_linf: search bounds need 0 < eps_min < eps_max"),
    # Everything the config names is used, or refused: nothing is silently ignored.
    "style of a figure that does not exist": (
        {"figures": {"style": {"fig_2": {"font_size": 3}}}},
        "figures.style: unknown key 'fig_2' (did you mean 'fig2'? expected one of: fig2, fig3"),
    "misspelt style key": ({"figures": {"style": {"fig2": {"fontsize": 3}}}},
                           "figures.style.fig2: unknown key 'fontsize' (did you mean 'font_size'?"),
    "style value of the wrong kind": ({"figures": {"style": {"fig3": {"label_models": "some"}}}},
                                      "figures.style.fig3.label_models: 'some' is not one of"),
    "override for a model the attack does not run on": (
        {"attacks": {"overrides": {"levit_demo": {"cw_l2": {"steps": 5}}}}},
        "attacks.overrides.levit_demo.cw_l2: cw_l2 is not run on levit_demo (it attacks 8 of the 28 models"),
    "AutoAttack component the version lacks": (
        {"attacks": {"autoattack": {"components": ["apgd-dlr"]}}},
        "attacks.autoattack: components: apgd-dlr not in the standard version's apgd-ce, apgd-t, fab-t, square"),
    "override for an attack that is not enabled": (
        {"attacks": {"overrides": {"resnet_demo": {"fmn_l2": {"steps": 5}}}}},
        "attacks.overrides.resnet_demo.fmn_l2: fmn_l2 is not in attacks.enabled (pgd_l2, pgd_linf, cw_l2, autoattack)"),
    "empty class list": ({"data": {"paper": {"stimuli": {"classes": []}}}},
                         "data.paper.stimuli.classes: [] is not valid (expected 'all' (the 1000 ImageNet classes) "
                         "or a non-empty list of class indices 0..999)"),
}


@pytest.mark.parametrize("case", sorted(BAD_OVERLAYS))
def test_attack_mistakes_are_one_line_planning_errors_and_check_config_agrees(case, tmp_path, capsys):
    from advalign.cli import main

    overlay, message = BAD_OVERLAYS[case]
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    assert main(["check-config", str(path)]) == 1  # an overlay alone, merged onto config/config.yaml
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    proc = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-n", "--configfile", str(path)],
                          cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr


def test_unknown_architectures_and_bad_kwargs_of_the_demo_zoo_fail_while_planning(tmp_path, capsys):
    from advalign.cli import main

    rows = (REPO / "config/zoo_demo.csv").read_text().splitlines()
    header = rows[0]
    table = tmp_path / "zoo.csv"
    for change, message in (
        (lambda r: r.replace("resnet10t", "resnet10x", 1), "timm cannot build 'resnet10x'"),
        (lambda r: r.replace('"stem_width"', '"stem_wdith"', 1), "timm cannot build 'resnet10t'"),
    ):
        edited = [header] + [change(r) if r.startswith("resnet_demo,") else r for r in rows[1:]]
        table.write_text("\n".join(edited) + "\n")
        path = tmp_path / "overlay.yaml"
        path.write_text(yaml.safe_dump({"zoo": {"table": str(table)}}))
        assert main(["check-config", str(path)]) == 1
        err = capsys.readouterr().err
        # The zoo table's file and line, then the model.
        line = next(n for n, r in enumerate(edited, start=1) if r.startswith("resnet_demo,"))
        assert f"{table}: line {line}: resnet_demo: " + message in err and err.count("\n") == 1, err


def test_duplicate_model_ids_name_both_lines(tmp_path, capsys):
    from advalign.cli import main

    rows = (REPO / "config/zoo_demo.csv").read_text().splitlines()
    table = tmp_path / "zoo.csv"
    first = next(n for n, r in enumerate(rows, start=1) if r.startswith("resnet_demo,"))
    table.write_text("\n".join([*rows, rows[first - 1]]) + "\n")  # resnet_demo again, as the last row
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump({"zoo": {"table": str(table)}}))
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{table}: line {len(rows) + 1} (resnet_demo): model id already used on line {first}" in err, err
    assert err.count("\n") == 1, err
    derived = tmp_path / "derived.yaml"  # a derived model reusing a table id names the table line
    derived.write_text(yaml.safe_dump({"zoo": {"derived": [{"model": "vit_demo", "training": "control",
                                                            "base_model": "resnet_demo"}]}}))  # fmt: skip
    assert main(["check-config", str(derived)]) == 1
    err = capsys.readouterr().err
    assert "config zoo.derived[0] (vit_demo): model id already used (config/zoo_demo.csv: line" in err, err


def test_yaml_errors_name_the_line(tmp_path, capsys):
    from advalign.cli import main

    path = tmp_path / "broken.yaml"
    path.write_text("attacks:\n  pgd_l2: {steps: 3\n  cw_l2: {}\n")
    assert main(["check-config", str(path)]) == 1
    assert f"{path}:3: not valid YAML" in capsys.readouterr().err


def test_a_killed_demo_attack_resumes_part_way():
    """The demo's chunks are smaller than its stimulus set (and CW's subset), so a killed attack
    job resumes from its finished chunks (tests/test_attack_resume.py: byte-identical)."""
    from advalign.config import load_config

    config = load_config(REPO / "config/config.yaml")
    synthetic, attacks = config["data"]["synthetic"], config["attacks"]
    stimuli = synthetic["n_classes"] * synthetic["stimuli_per_class"]
    assert attacks["chunk_size"] * 2 <= stimuli and attacks["chunk_size"] < attacks["cw_l2"]["n_images"]


def test_a_partly_written_block_keeps_its_own_defaults():
    """pgd_linf's own default bound (1.0) holds when its block sets other keys only."""
    from advalign.attacks import get_attack

    config = validate_config({"data": {"kind": "synthetic"}, "zoo": {"table": "x.csv"},
                              "attacks": {"pgd_linf": {"steps": 5}}})  # fmt: skip
    assert config["attacks"]["pgd_linf"]["eps_max"] == 1.0 and config["attacks"]["pgd_linf"]["steps"] == 5
    assert config["attacks"]["pgd_l2"]["eps_max"] == 10.0
    assert get_attack("pgd_linf").config(config["attacks"]["pgd_linf"]).eps_max == 1.0
