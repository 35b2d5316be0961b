"""`snakemake --report` after a complete run: one HTML file with every figure and table,
each with its caption from workflow/report/*.rst."""

from __future__ import annotations

import json
import re

import pytest

from advalign.figure_registry import figure_names
from conftest import snakemake

pytestmark = pytest.mark.slow

EXPECTED = [f"figures/{fig}.png" for fig in figure_names()] + [
    "results/stats/model_attack_table.csv",
    "results/tables/claims.csv",
    "results/tables/table_s1.csv",
    "results/tables/table_s2.csv",
]


def test_report_has_every_figure_and_table_with_a_caption(tiny_run, tmp_path):
    report = tmp_path / "report.html"
    snakemake(tiny_run.workdir, *tiny_run.config_args(), "--report", str(report))
    html = report.read_text()
    # The report embeds its entries as a JavaScript object: var results = {...};
    match = re.search(r"var results = (\{.*?\});\s*</script>", html, flags=re.S)
    assert match, "no results table in the report"
    results = json.loads(match.group(1))
    missing = [path for path in EXPECTED if path not in results]
    assert not missing, f"not in the report: {missing}"
    for path in EXPECTED:
        caption = re.sub(r"<[^>]+>", "", results[path].get("caption") or "").strip()
        assert len(caption) > 20, f"{path} has no caption"
        assert "Error" not in caption and "System Message" not in caption, f"{path}: caption did not render: {caption[:200]}"
