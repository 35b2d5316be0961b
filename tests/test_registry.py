"""The registries: a new attack costs one file plus its config block, a new figure one entry
plus its caption, and the workflow plans them with nothing else touched.

In a private copy of the repository, a toy attack file is dropped into
``src/advalign/attacks/`` and a toy figure is registered in ``figure_registry.py``; an
overlay config enables the attack. Snakemake then plans, in that copy, one attack job per
model for the toy attack and one figure job, validates the toy block against the schema
the attack declared, and the code fingerprint of the attack rule covers the new file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from advalign.attacks import attack_names, get_attack, registered_attacks
from advalign.columns import ATTACK_COLUMNS
from advalign.config import load_schema, validate_config
from advalign.figure_registry import REPORT_DIR, figure_names, figures_of_kind
from conftest import BIN, REPO, copy_repo

TOY_ATTACK = '''"""A toy minimal-norm attack (registry test): the smallest step along the normalised clean
gradient, on a geometric grid of radii, that changes the prediction."""

from dataclasses import dataclass

import numpy as np
import torch

from .function import per_image
from .registry import Attack, AttackResult, register_attack


@dataclass(frozen=True)
class ToyConfig:
    radii: int
    largest: float

    def describe(self) -> str:
        return f"toy line search over {self.radii} radii up to {self.largest:g}"


def run(fn, x, y, config, *, batch_size, keys, progress=False):
    n = len(x)
    grad = fn.loss_gradient(x, y)
    direction = grad / per_image(grad.flatten(1).norm(dim=1).clamp_min(1e-12))
    best = torch.zeros_like(x)
    success = np.zeros(n, dtype=bool)
    adv_pred = np.full(n, -1, dtype=np.int64)
    for radius in np.geomspace(config.largest / 1000, config.largest, config.radii):
        adv = (x + float(radius) * direction).clamp(0, 1)
        pred = fn.predict(adv).cpu().numpy()
        new = (pred != y.cpu().numpy()) & ~success
        best[torch.as_tensor(new)] = (adv - x)[torch.as_tensor(new)]
        adv_pred[new] = pred[new]
        success |= new
    l2 = best.flatten(1).double().norm(dim=1).cpu().numpy()
    return AttackResult(success=success, epsilon=np.where(success, l2, np.nan), censored=np.zeros(n, dtype=bool),
                        lower=np.full(n, np.nan), perturbation=best.float().cpu(), adv_pred=adv_pred,
                        grad_evals=np.ones(n, dtype=np.int64), trials=np.full(n, config.radii, dtype=np.int64))


register_attack(
    Attack(
        name="toy_l2",
        norm="l2",
        kind="minimal_norm",
        title="toy",
        reference="none: a registry test",
        epsilon="l2 norm of the smallest fooling step along the gradient",
        make_config=lambda block: ToyConfig(**block),
        run=run,
        schema={
            "type": "object",
            "additionalProperties": False,
            "default": {},
            "properties": {
                "radii": {"type": "integer", "minimum": 2, "default": 12},
                "largest": {"type": "number", "exclusiveMinimum": 0, "default": 4.0},
            },
        },
        enabled_by_default=False,
    )
)
'''

TOY_FIXED_EPSILON = '''"""A toy fixed-ε attack (registry test): one normalised gradient step of length ε (FGM-ℓ2),
searched over ε by the minimal-ε search like PGD."""

from dataclasses import dataclass

import torch

from .function import per_image
from .registry import register_attack
from .search import minimal_epsilon_attack


@dataclass(frozen=True)
class GradientStep:
    scale: float
    norm: str = "l2"
    first_step_at_x: bool = True

    def __call__(self, fn, x, y, eps, *, keys, trials, clean_grad=None):
        grad = fn.loss_gradient(x, y) if clean_grad is None else clean_grad
        unit = grad / per_image(grad.flatten(1).norm(dim=1).clamp_min(1e-12))
        radius = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
        adv = (x + self.scale * per_image(radius) * unit).clamp(0, 1)
        with torch.no_grad():
            return adv, fn.logits(adv), 0 if clean_grad is not None else 1


register_attack(
    minimal_epsilon_attack(
        "toy_step_l2", "l2", "toy step", "none: a registry test",
        make_attack=lambda block: GradientStep(**block),
        attack_schema={"type": "object", "properties": {"scale": {"type": "number", "default": 1.0}}},
        search_defaults={"eps_max": 4.0},
        enabled_by_default=False,
    )
)
'''

TOY_FIGURE = '''

register_figure(Figure("figToy", "scatter", "Toy: l2 vs l_inf PGD tolerance",
                       ScatterSpec(Axis("pgd_l2", "tolerance", "tolerance_se", "l2 tolerance"),
                                   Axis("pgd_linf", "tolerance", "tolerance_se", "l_inf tolerance"),
                                   "both", "plotted")))
'''

PLAN = """
import json
from advalign.attacks import attack_names
from advalign.planning import Plan, planned_config
config, zoo, _ = planned_config(["config/config.yaml", "toy.yaml"])
plan = Plan(config, zoo)
jobs = {a: plan.attack_models(a) for a in attack_names()}
print(json.dumps(jobs))
for attack in ("toy_step_l2", "toy_l2"):
    print(json.dumps({"job": plan.attack_params(attack, "resnet_demo"), "code": plan.attack_code_version(attack)},
                     default=str))
"""


def test_the_paper_attacks_and_figures_come_from_the_registries():
    # The paper's three first, then AutoAttack (a related paper's fixed-eps measure), then the
    # optional minimal-norm references (advalign.attacks.references).
    assert attack_names() == ("pgd_l2", "pgd_linf", "cw_l2", "autoattack", "fmn_l2", "ddn_l2", "alma_l2", "apgd_l2")
    assert [a.tolerance_column for a in registered_attacks()] == ["l2", "linf", "l2", "linf"] + ["l2"] * 4
    assert [a.kind for a in registered_attacks()] == (["minimal_epsilon"] * 2 + ["minimal_norm", "fixed_epsilon"]
                                                      + ["minimal_norm"] * 4)  # fmt: skip
    assert [a.enabled_by_default for a in registered_attacks()] == [True] * 3 + [False] * 5
    schema = load_schema()["properties"]["attacks"]["properties"]
    assert schema["enabled"]["items"]["enum"] == list(attack_names())
    # Defaults live in the schema only: an empty block gives the attack's own config defaults.
    config = validate_config({"data": {"kind": "synthetic"}, "zoo": {"table": "x.csv"}})
    assert get_attack("pgd_linf").config(config["attacks"]["pgd_linf"]) == get_attack("pgd_linf").config({})
    assert get_attack("pgd_linf").config({}).eps_max == 1.0 and get_attack("pgd_l2").config({}).eps_max == 10.0
    assert figure_names() == ("fig2", "fig3", "fig4", "fig5", "figS1", "figS2", "figS3", "figS4", "figS5", "figM1",
                              "figV1", "figD1", "figA1", "figA2", "figA3")
    for figure in figures_of_kind("scatter") + figures_of_kind("qualitative"):
        assert (REPO / figure.caption).is_file(), figure.caption
        assert set(figure.attacks) <= set(attack_names())
    assert "attack" in ATTACK_COLUMNS


@pytest.mark.slow
def test_a_new_attack_and_a_new_figure_cost_one_file_each_plus_config(tmp_path):
    work = copy_repo(tmp_path / "repo")
    (work / "src/advalign/attacks/toy_l2.py").write_text(TOY_ATTACK)
    (work / "src/advalign/attacks/toy_step.py").write_text(TOY_FIXED_EPSILON)
    with open(work / "src/advalign/figure_registry.py", "a") as fh:
        fh.write(TOY_FIGURE)
    (work / REPORT_DIR / "figToy.rst").write_text("A toy scatter of the two PGD tolerances.\n")
    (work / "toy.yaml").write_text(json.dumps({"attacks": {"enabled": ["pgd_l2", "pgd_linf", "cw_l2", "toy_l2",
                                                                       "toy_step_l2"],
                                                          "toy_l2": {"radii": 6}, "toy_step_l2": {"precision": 0.02}}}))  # fmt: skip
    # The copy's own package, not the installed one.
    env = {**os.environ, "PYTHONPATH": str(work / "src")}
    proc = subprocess.run([sys.executable, "-c", PLAN], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned, step_job, toy_job = (json.loads(line) for line in proc.stdout.strip().splitlines()[-3:])
    models = [line.split(",")[0] for line in (work / "config/zoo_demo.csv").read_text().splitlines()[1:]
              if line and not line.startswith("#")]  # fmt: skip
    assert len(planned["toy_l2"]) >= len(models) > 0  # every base model (and the derived ones) is attacked
    assert toy_job["job"]["spec"] == {"radii": 6, "largest": 4.0}  # the attack's schema filled the default
    # A fixed-ε attack gets the minimal-ε search: the search's keys and defaults, its own on top.
    assert planned["toy_step_l2"] == planned["toy_l2"]
    assert step_job["job"]["spec"] == {"eps_min": 1e-6, "eps_max": 4.0, "stop": "relative", "precision": 0.02,
                                       "threshold": 0.001, "bracket": "auto", "verify": 0.03, "scale": 1.0}
    # Each attack job's fingerprint counts its own attack's file, not the other attacks'.
    assert step_job["code"] != toy_job["code"]
    # Snakemake plans one job per model for each new attack, and the new figure.
    dry = subprocess.run([str(BIN / "snakemake"), "-n", "--quiet", "rules", "--configfile", "config/config.yaml",
                          "toy.yaml"], cwd=work, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert dry.returncode == 0, dry.stderr[-3000:]
    stats = dict(line.split() for line in (dry.stdout + dry.stderr).splitlines() if len(line.split()) == 2
                 and line.split()[1].isdigit())  # fmt: skip
    assert int(stats["attack"]) == sum(len(m) for m in planned.values()) and stats["figure_figToy"] == "1"
    # The attack rule's code fingerprint covers the new file (editing it reruns the attacks).
    from advalign.provenance import package_modules

    modules = package_modules(work / "workflow/scripts/attack.py", work / "src/advalign")
    assert {"advalign.attacks.toy_l2", "advalign.attacks.toy_step"} <= set(modules)

    # The toy block is validated against the schema the attack declared, while planning.
    (work / "toy.yaml").write_text(json.dumps({"attacks": {"enabled": ["toy_l2"], "toy_l2": {"radii": 1}}}))
    bad = subprocess.run([str(BIN / "snakemake"), "-n", "--configfile", "config/config.yaml", "toy.yaml"], cwd=work,
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert bad.returncode != 0
    assert "attacks.toy_l2.radii: 1 is less than the minimum of 2" in bad.stdout + bad.stderr
