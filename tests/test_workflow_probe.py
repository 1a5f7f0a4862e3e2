"""The whole probe through Snakemake on the embedded policy, held against its exact enumeration:
δH₁ = η·X·v against the exact η·∇H·v, SNIS ΔH(η) against the exact ΔH(η), the report files, and
what a change of the η sweep reruns.

Reads the session's uninterrupted run (conftest.default_run, a few minutes on 2 cores); deselect
with ``-m "not workflow"``.
"""
from __future__ import annotations

import json

import pytest
import yaml
from conftest import RUN_CONFIG, RUN_SETTINGS

from workflow_util import dry_run_jobs, run_snakemake

pytestmark = pytest.mark.workflow

ETAS = RUN_SETTINGS["estimator"]["eta_list"]
assert RUN_SETTINGS["batch_config"]["E_total_sequences"] >= 2048  # the tolerances below assume it


@pytest.fixture(scope="module")
def probe_dir(default_run):
    return default_run


@pytest.fixture(scope="module")
def summary(probe_dir):
    return json.loads((probe_dir / "results" / "summary.json").read_text())


def test_report_files_and_provenance(probe_dir, summary):
    results = probe_dir / "results"
    assert (results / "plot.png").stat().st_size > 10_000
    table = (results / "summary.txt").read_text()
    assert "δH₁" in table and len(table.splitlines()) == 3 + len(ETAS)  # title, header, rows, the U batch line
    assert summary["config"]["estimator"]["eta_list"] == ETAS
    assert len(summary["git_commit"]) == 40 and summary["model_fingerprint"]
    assert [row["eta"] for row in summary["rows"]] == ETAS
    assert not list(results.rglob("*.tmp*")), "temporary files left behind"


def test_first_order_matches_exact_gradient(summary):
    """X·v (E batch of 2048 sequences) against the exact ∇H·v, within 4 E-side SE."""
    first, exact = summary["first_order"], summary["exact"]
    z = (first["X_dot_v"] - exact["grad_H_dot_v"]) / first["X_dot_v_se"]
    assert abs(z) < 4, (first["X_dot_v"], exact["grad_H_dot_v"], first["X_dot_v_se"])
    # the two passes computing X·v (reverse and forward mode) agree
    assert first["X_dot_v_relative_difference"] < 1e-4
    assert sum(first["X_dot_v_by_module"].values()) == pytest.approx(first["X_dot_v"], rel=1e-9)
    # the U jackknife ran (2 U shards) and the total SE includes it
    assert summary["u_jackknife"]["available"]
    for row in summary["rows"]:
        assert row["delta_h1_se_total"] > row["delta_h1_se"]


def test_snis_matches_exact_delta_h(summary):
    exact = {r["eta"]: r["exact_delta_h"] for r in summary["exact"]["delta_h"]}
    for row in summary["delta_h_snis"]["rows"]:
        z = (row["delta_h"] - exact[row["eta"]]) / row["se"]
        assert abs(z) < 4, row | {"exact": exact[row["eta"]]}
        assert 0 < row["ess"] <= row["num_sequences"]
    # central differences were measured for every η
    assert all("central_difference" in row for row in summary["rows"])


def test_exact_ratio_tends_to_one(summary):
    """η·∇H·v / ΔH(η) → 1 linearly as η → 0 (exact quantities)."""
    gaps = [abs(r["exact_delta_h1"] / r["exact_delta_h"] - 1) for r in summary["exact"]["delta_h"] if r["eta"] > 0]
    assert gaps == sorted(gaps) and gaps[0] < 0.01, gaps


def test_changing_only_the_eta_sweep_reruns_only_the_eta_stages(probe_dir):
    config = yaml.safe_load((probe_dir / RUN_CONFIG).read_text())
    config["estimator"]["eta_list"] = [2e-5, 2e-4]
    (probe_dir / "probe_eta.yaml").write_text(yaml.safe_dump(config))
    jobs = dry_run_jobs(probe_dir, "probe_eta.yaml")
    assert jobs == {"snis_shard": 2, "delta_h_snis": 1, "delta_h1": 1, "exact_reference": 1, "summary": 1, "all": 1}


def test_snakemake_report_opens_on_the_table_and_the_plot(probe_dir):
    """The report's landing page (the global workflow description) holds the summary table and
    the plot itself, not just links to them."""
    import base64

    run_snakemake(probe_dir, RUN_CONFIG, "--report", "report.html", timeout=300)
    html = (probe_dir / "report.html").read_text()
    rows = (probe_dir / "results" / "summary.txt").read_text().splitlines()[2:]
    assert rows and all(row.strip()[:40] in html for row in rows)  # every row of the table
    plot = base64.b64encode((probe_dir / "results" / "plot.png").read_bytes()).decode()
    assert f"filename=plot.png;base64,{plot[:200]}" in html  # the plot itself, as a data URI
    assert "Units: nats per token" in html
