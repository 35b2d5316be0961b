"""Reruns only what changed, read from Snakemake's own plan.

After one complete run of the tiny config (the session's `tiny_run`, shared with
test_workflow.py), each test adds one change as an extra config file on top of it
and asks `snakemake -n` which jobs it would run. Dry runs write no outputs, so the
tests do not disturb each other or the shared run.
"""

from __future__ import annotations

import contextlib
import csv
import re
from pathlib import Path

import pytest
import yaml

from advalign.figure_registry import figure_names
from conftest import snakemake

pytestmark = pytest.mark.slow

FIGURE_RULES = {f"figure_{fig}" for fig in figure_names()}
# Everything downstream of the per-model results: re-planned whenever any model's
# attack or training output is re-planned ("all" has no job of its own to run).
AGGREGATE_RULES = {"model_table", "statistical_tests", "claims", "table_s1", "table_s2", "all"} | FIGURE_RULES
PER_MODEL_RULES = {"train", "attack"}
# Measured cue reliance and (synthetic: one job for all models) the human feature alignment read
# every model's weights: re-planned when the zoo's models change.
RELIANCE_RULES = {"cue_reliance", "human_alignment"}
# Attention under attack (synthetic: one job for all models) reads every model's weights and its
# main-attack (l2-PGD) examples: re-planned when the zoo's models or any l2-PGD result change.
ATTENTION_RULES = {"attention"}

_JOB_HEADER = re.compile(r"^(?:local)?(?:rule|checkpoint) (\S+):$")
_STATS_ROW = re.compile(r"^(\S+)\s+(\d+)$")


class Plan:
    """The jobs of a `snakemake -n` run: (rule, wildcards) for each job block, checked
    against the "Job stats" table that Snakemake prints under them."""

    def __init__(self, output: str):
        self.output = output
        self.jobs: list[tuple[str, dict[str, str]]] = []
        rule = None
        wildcards: dict[str, str] = {}
        for line in output.splitlines():
            header = _JOB_HEADER.match(line)
            if header:
                if rule is not None:
                    self.jobs.append((rule, wildcards))
                rule, wildcards = header.group(1), {}
            elif rule is not None and line.strip().startswith("wildcards:"):
                pairs = line.split(":", 1)[1].split(",")
                wildcards = dict(pair.strip().split("=", 1) for pair in pairs if "=" in pair)
            elif rule is not None and not line.startswith((" ", "\t")):
                self.jobs.append((rule, wildcards))
                rule = None
        if rule is not None:
            self.jobs.append((rule, wildcards))
        self.counts = self._job_stats()
        planned = {}
        for name, _ in self.jobs:
            planned[name] = planned.get(name, 0) + 1
        assert planned == self.counts, f"job blocks {planned} disagree with the Job stats table {self.counts}"

    def _job_stats(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        lines = self.output.splitlines()
        for i, line in enumerate(lines):
            if line.strip() != "Job stats:":
                continue
            for row in lines[i + 3 :]:  # "Job stats:", header, dashes
                match = _STATS_ROW.match(row.strip())
                if not match:
                    break
                if match.group(1) != "total":
                    counts[match.group(1)] = int(match.group(2))
            break
        return counts

    @property
    def rules(self) -> set[str]:
        return set(self.counts)

    def per_model(self) -> list[tuple[str, str, str | None]]:
        """(rule, model, attack) of every training and attack job."""
        return sorted(
            (rule, wc["model"], wc.get("attack")) for rule, wc in self.jobs if rule in PER_MODEL_RULES
        )

    def describe(self) -> str:
        return "\n".join(f"{rule} {wc}" for rule, wc in self.jobs) or "(nothing)"


def plan(run, tmp_path: Path, change: dict | None = None) -> Plan:
    args = ["-n", *run.config_args()]
    if change is not None:
        overlay = tmp_path / "change.yaml"
        overlay.write_text(yaml.safe_dump(change))
        args += [str(overlay)]  # a second --configfile value, merged on top of the tiny config
    proc = snakemake(run.workdir, *args)
    return Plan(proc.stdout + proc.stderr)


def tiny_config(run) -> dict:
    from advalign.config import load_config

    return load_config(run.path(run.configfile))


def attacked_models(run, attack: str) -> list[str]:
    return sorted(p.stem for p in run.path(f"results/attacks/{attack}").glob("*.parquet"))


def assert_only(result: Plan, per_model: list, rules: set[str]) -> None:
    assert result.per_model() == sorted(per_model), result.describe()
    assert result.rules - PER_MODEL_RULES == rules, result.describe()
    assert all(n == 1 for r, n in result.counts.items() if r not in PER_MODEL_RULES), result.counts


def test_nothing_changed_plans_nothing(tiny_run, tmp_path):
    result = plan(tiny_run, tmp_path)
    assert result.jobs == [], result.describe()
    assert "Nothing to be done" in result.output


def test_one_models_attack_parameter_reruns_that_attack_and_the_aggregates(tiny_run, tmp_path):
    model = attacked_models(tiny_run, "pgd_l2")[0]
    steps = tiny_config(tiny_run)["attacks"]["pgd_l2"]["steps"]
    change = {"attacks": {"overrides": {model: {"pgd_l2": {"steps": steps + 1}}}}}
    result = plan(tiny_run, tmp_path, change)
    assert_only(result, [("attack", model, "pgd_l2")], AGGREGATE_RULES | ATTENTION_RULES)
    reason = re.search(r"reason: (.*)", result.output[result.output.index("rule attack:") :]).group(1)
    assert "Params have changed" in reason, reason


def test_figure_style_replots_only_that_figure(tiny_run, tmp_path):
    change = {"figures": {"style": {"fig2": {"marker_size": 31}}}}
    result = plan(tiny_run, tmp_path, change)
    assert_only(result, [], {"figure_fig2", "all"})


def test_other_cpu_kernels_rerun_every_computation_and_no_stimuli(tiny_run, tmp_path):
    config = tiny_config(tiny_run)
    other = "native" if config["cpu_kernels"] == "avx2" else "avx2"
    result = plan(tiny_run, tmp_path, {"cpu_kernels": other})
    trained = sorted(p.parent.name for p in tiny_run.path("results/models").glob("*/metrics.json"))
    expected = [("train", m, None) for m in trained] + [
        ("attack", m, a) for a in config["attacks"]["enabled"] for m in attacked_models(tiny_run, a)
    ]
    assert_only(result, expected, AGGREGATE_RULES | RELIANCE_RULES | ATTENTION_RULES)


def test_new_model_runs_only_its_own_jobs_and_the_aggregates(tiny_run, tmp_path):
    config = tiny_config(tiny_run)
    source = tiny_run.path(config["zoo"]["table"])
    with source.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if not row[next(iter(row))].startswith("#")]
    template = next(r for r in rows if r["arch_class"] == "CNN")
    new_model = f"{template['model']}_added"
    extended = tmp_path / "zoo_plus_one.csv"
    with extended.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + [{**template, "model": new_model}])
    result = plan(tiny_run, tmp_path, {"zoo": {"table": str(extended)}})

    per_model = result.per_model()
    assert ("train", new_model, None) in per_model, result.describe()
    assert ("attack", new_model, "pgd_l2") in per_model, result.describe()
    assert {model for _, model, _ in per_model} == {new_model}, result.describe()
    assert {attack for _, _, attack in per_model} - {None} <= set(config["attacks"]["enabled"])
    assert result.rules - PER_MODEL_RULES == AGGREGATE_RULES | RELIANCE_RULES | ATTENTION_RULES, result.describe()


# --------------------------------------------------------------------------- code provenance


@contextlib.contextmanager
def edited(run, relative: str, change):
    """The run's copy of a file changed by ``change(text) -> text`` for the duration of the block."""
    path = run.path(relative)
    original = path.read_text()
    path.write_text(change(original))
    try:
        yield
    finally:
        path.write_text(original)


def _code_edit(text: str) -> str:
    return text + "\n_PROVENANCE_PROBE = 1  # a change to what the module does\n"


def _comment_and_docstring_edit(text: str) -> str:
    assert text.startswith('"""')
    return '"""Edited docstring. ' + text[3:] + "\n# a new comment\n"


def test_editing_figure_code_replots_only_the_figures(tiny_run, tmp_path):
    with edited(tiny_run, "src/advalign/figures.py", _code_edit):
        result = plan(tiny_run, tmp_path)
    assert_only(result, [], FIGURE_RULES | {"all"})


def test_editing_attack_code_reruns_the_attacks_it_runs_and_what_follows(tiny_run, tmp_path):
    """search.py runs both PGD attacks, not CW; job.py runs every attack."""
    for module, attacks in (("search.py", ("pgd_l2", "pgd_linf")), ("job.py", tiny_config(tiny_run)["attacks"]["enabled"])):
        with edited(tiny_run, f"src/advalign/attacks/{module}", _code_edit):
            result = plan(tiny_run, tmp_path)
        expected = [("attack", m, a) for a in attacks for m in attacked_models(tiny_run, a)]
        assert_only(result, expected, AGGREGATE_RULES | ATTENTION_RULES)  # no training job; l2-PGD reran
    reason = re.search(r"reason: (.*)", result.output[result.output.index("rule attack:") :]).group(1)
    assert "Params have changed" in reason, reason


def test_editing_one_attacks_code_reruns_that_attack_alone(tiny_run, tmp_path):
    """Each attack job's fingerprint counts its own attack's module, not the other attacks'."""
    enabled = tiny_config(tiny_run)["attacks"]["enabled"]
    assert "cw_l2" in enabled and "pgd_l2" in enabled
    with edited(tiny_run, "src/advalign/attacks/cw.py", _code_edit):
        result = plan(tiny_run, tmp_path)
    assert_only(result, [("attack", m, "cw_l2") for m in attacked_models(tiny_run, "cw_l2")], AGGREGATE_RULES)


def test_editing_statistics_code_reruns_the_statistics_and_everything_downstream(tiny_run, tmp_path):
    with edited(tiny_run, "src/advalign/stats.py", _code_edit):
        result = plan(tiny_run, tmp_path)
    assert_only(result, [], AGGREGATE_RULES)


def test_comments_docstrings_tests_and_readme_plan_nothing(tiny_run, tmp_path):
    with edited(tiny_run, "src/advalign/attacks/pgd.py", _comment_and_docstring_edit), \
            edited(tiny_run, "README.md", lambda t: t + "\nOne more line.\n"), \
            edited(tiny_run, "tests/test_rerun.py", _code_edit):  # fmt: skip
        result = plan(tiny_run, tmp_path)
    assert result.jobs == [], result.describe()
