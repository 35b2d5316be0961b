"""Print, as JSON, the ``params`` of every job Snakemake plans for some targets.

Run as ``python planned_params.py RULE CONFIGFILE... -- TARGET...`` in a workflow folder:
it builds the DAG through Snakemake's own API (the same planning a dry run does) and prints
{wildcards-as-text: params} for the jobs of RULE. Tests use it to read what a job would be
given, which a dry run does not print.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from snakemake.api import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings, SnakemakeApi, StorageSettings


def planned_params(rule: str, configfiles: list[str], targets: list[str]) -> dict:
    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[Path(f) for f in configfiles]),
            storage_settings=StorageSettings(),
            snakefile=Path("Snakefile"),
        )
        workflow_api.dag(DAGSettings(targets=set(targets)))
        workflow = workflow_api._workflow  # the API builds the DAG lazily; list_changes does the same
        workflow._prepare_dag(forceall=False, ignore_incomplete=False, lock_warn_only=True)
        workflow._build_dag()
        return {
            ",".join(f"{k}={v}" for k, v in job.wildcards.items()): dict(job.params.items())
            for job in workflow.dag.jobs
            if job.rule.name == rule
        }


if __name__ == "__main__":
    rule, rest = sys.argv[1], sys.argv[2:]
    split = rest.index("--")
    print(json.dumps(planned_params(rule, rest[:split], rest[split + 1 :]), default=str))
