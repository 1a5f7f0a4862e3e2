"""The whole probe through Snakemake on the embedded policy, held against its exact enumeration:
δH₁ = η·X·v against the exact η·∇H·v, SNIS ΔH(η) against the exact frozen-nucleus ΔH(η), the
sampler's ΔH(η) (coupled fresh rollouts) against the exact own-nucleus ΔH(η) and against the same
estimator with independent noise, the report files with every column named, and what a change of
the η sweep reruns.

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
RUN_VARIANTS = list(RUN_SETTINGS["update"]["variants"])
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
    assert "δH₁" in table and len(data_lines(table)) == len(ETAS)
    assert "precision: float32" in table and summary["precision"]["compute"] == "float32"
    assert summary["config"]["estimator"]["eta_list"] == ETAS
    assert len(summary["git_commit"]) == 40 and summary["model_fingerprint"]
    assert [row["eta"] for row in summary["rows"]] == ETAS
    assert not list(results.rglob("*.tmp*")), "temporary files left behind"


def data_lines(table: str) -> list[str]:
    """The table's lines of numbers, one per η."""
    return [line for line in table.splitlines() if line.split() and line.split()[0][0].isdigit()]


def test_table_and_plot_name_all_four_quantities(probe_dir, summary, tmp_path):
    """δH₁ (first order), ΔH with the nucleus of θ (SNIS), ΔH of the sampler (fresh rollouts) and
    the exact values of both: labelled in the table's legend and header, filled in every row, and
    in the plot's legend (report.plot on the run's own rows)."""
    from entropy_probe import report

    table = (probe_dir / "results" / "summary.txt").read_text()
    for label in ("first order", "(SNIS)", "smooth target", "(fresh rollouts", "what training will see",
                  "ΔH θ-nucleus", "ΔH sampler", "exact θ-nuc", "exact sampler", "coupling", "changed"):
        assert label in table, label
    for row in summary["rows"]:
        for key in ("delta_h1", "delta_h", "ratio_se", "delta_h_sampler", "delta_h_sampler_se", "changed_responses",
                    "coupling_se_factor", "delta_h_boundary", "delta_h_boundary_se", "exact_delta_h",
                    "exact_delta_h_sampler"):
            assert row.get(key) is not None, (key, row["eta"])
    assert all(line.count("|") == 3 and " - " not in line for line in data_lines(table))
    assert set(summary["columns"]) == {"delta_h1", "delta_h", "delta_h_sampler", "delta_h_boundary", "exact_delta_h",
                                       "exact_delta_h_sampler"}
    labels = report.plot(summary["rows"], tmp_path / "plot.png", summary["unit"])
    for wanted in ("δH₁", "(SNIS)", "of the sampler (fresh rollouts)", "exact ΔH, nucleus of θ",
                   "exact ΔH of the sampler (own nucleus)", "delta-method"):
        assert any(wanted in label for label in labels), (wanted, labels)


def test_sampler_matches_exact_own_nucleus(summary):
    """ΔH_sampler(η) (2048 coupled fresh rollouts per η) against the exact own-nucleus ΔH(η),
    within 4 SE; at the smallest η the sampler's exact change and the frozen-nucleus one differ in
    sign on this policy (top_p 0.95: tokens cross the nucleus boundary)."""
    for row in summary["rows"]:
        z = (row["delta_h_sampler"] - row["exact_delta_h_sampler"]) / row["delta_h_sampler_se"]
        assert abs(z) < 4, row
    first = summary["rows"][0]
    assert first["exact_delta_h_sampler"] * first["exact_delta_h"] < 0, first
    assert summary["rows"][-1]["changed_responses"] > first["changed_responses"] > 0


def test_coupling_pays_at_the_smallest_eta(probe_dir, summary):
    """At the smallest η of the sweep, the coupled estimate's SE is at least 5x smaller than the
    SE of the same estimator with independent noise, measured here by redrawing the run's E
    shards at θ + ηv with another noise seed (measured on this run: SE 1.26e-4 coupled, 1.10e-3
    independent, 8.8x; 4 of 2048 responses changed); the factor the report estimates from the
    coupled data alone (8.0x) agrees with it within 30%."""
    from entropy_probe import fresh, fresh_pass, models, shards
    from entropy_probe.plan import shard_slots

    results = probe_dir / "results"
    config, gen = summary["config"], summary["config"]["generation"]
    model = models.load_policy(results / "policy", "float32", "cpu")
    tokenizer = models.load_tokenizer(results / "policy")
    v, _ = shards.read_shard(results / "update" / "v.safetensors")
    plan = shards.read_json(results / "plan" / "E.json")
    eta = min(ETAS)
    parts = []
    for k in range(len(plan["shards"])):
        rollout, _ = shards.read_shard(results / "rollouts" / "E" / f"shard_{k:03d}.safetensors")
        redrawn = fresh_pass.fresh_rollout_shard(
            model, tokenizer, rollout, v, eta, slots=shard_slots(plan, k), seed=config["batch_config"]["seed"] + 1,
            temperature=gen["temperature"], top_p=gen["top_p"], max_new_tokens=gen["max_new_tokens"],
            gen_batch_size=4096, stop_strings=gen["stop_strings"])[0]
        parts.append(fresh.per_response(redrawn, "sampler"))
    whole = {name: __import__("torch").cat([p[name] for p in parts]) for name in parts[0]}
    independent = fresh.delta_h_sampler(**whole, G=config["batch_config"]["G"], normalization="token")
    row = next(r for r in summary["rows"] if r["eta"] == eta)
    factor = independent["se"] / row["delta_h_sampler_se"]
    assert factor >= 5, (factor, independent["se"], row["delta_h_sampler_se"])
    assert row["coupling_se_factor"] == pytest.approx(factor, rel=0.3), (row["coupling_se_factor"], factor)


def test_first_order_matches_exact_gradient(summary):
    """X·v (E batch of 2048 sequences) against the exact ∇H·v, within 4 E-side SE."""
    first, exact = summary["first_order"], summary["exact"]
    z = (first["X_dot_v"] - exact["grad_H_dot_v"]) / first["X_dot_v_se"]
    assert abs(z) < 4, (first["X_dot_v"], exact["grad_H_dot_v"], first["X_dot_v_se"])
    # the two passes computing X·v (reverse and forward mode) agree
    assert first["X_dot_v_relative_difference"] < 1e-4
    assert sum(first["X_dot_v_by_module"].values()) == pytest.approx(first["X_dot_v"], rel=1e-9)
    # the U-batch SE (influence over the U prompt groups) is in the total; the jackknife ran as a check
    noise = summary["u_noise"]
    assert noise["degrees_of_freedom"] == RUN_SETTINGS["batch_config"]["B_U"] - 1
    assert summary["u_jackknife"]["available"] and noise["se_jackknife"] > 0
    for row in summary["rows"]:
        assert row["delta_h1_se_u"] == pytest.approx(row["eta"] * noise["se_influence"], rel=1e-12)
        assert row["delta_h1_se_total"] > row["delta_h1_se"]
    # SGD is linear in Y: the U shares' linear map predicts the jackknife's leave-one-shard-out values
    assert noise["linearization"]["max_error_relative_to_change"] < 1e-6


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
    # the fresh rollouts of the two new η (two E shards each), not those of the old ones; the
    # SNIS pass of each variant that measures ΔH (it covers the sweep)
    measuring = [name for name, rule in RUN_SETTINGS["update"]["variants"].items() if rule.get("snis")]
    assert measuring and jobs == {"snis_shard": 2, "delta_h_snis": 1, "delta_h1": 1, "fresh_rollout": 4,
                                  "delta_h_sampler": 1, "exact_reference": 1, "summary": 1, "all": 1,
                                  "variant_snis_shard": 2 * len(measuring)}


def test_the_report_reads_in_a_browser_wherever_the_file_is_moved(probe_dir, tmp_path):
    """The report's landing page, rendered by headless Chromium after report.html was copied into
    an empty directory: the plot embedded in the page (loaded), the table within its column, the
    table's numbers those of summary.json; the attribution and the variants among the results."""
    import base64

    from browser import assert_readable, open_moved_report

    from entropy_probe import report_page

    run_snakemake(probe_dir, RUN_CONFIG, "--report", "report.html", timeout=300)
    page = open_moved_report(probe_dir / "report.html", tmp_path / "elsewhere")
    assert_readable(page)
    table = page.tables[0]["text"]
    for row in json.loads((probe_dir / "results" / "summary.json").read_text())["rows"]:
        cells = report_page.summary_cells(row)
        assert all(cell in table for cell in cells[:3]), (cells, table)
    assert "Units: nats per token" in page.text
    html = (probe_dir / "report.html").read_text()
    for name in ("attribution.txt", "variants.txt", "summary.txt"):  # a click away: embedded, whole
        embedded = base64.b64encode((probe_dir / "results" / name).read_bytes()).decode()
        assert f"filename={name};base64,{embedded}" in html, name


def test_attribution_sums_and_report(probe_dir, summary):
    """The token shares of both batches sum to X·v; the report shows decoded top responses with the
    covariance column beside the U shares, and the covariance figures."""
    from entropy_probe import shards

    results = probe_dir / "results"
    x_dot_v = summary["first_order"]["X_dot_v"]
    e, _ = shards.read_shard(results / "attribution" / "E_tokens.safetensors", {"kind": "attribution_E"})
    u, _ = shards.read_shard(results / "attribution" / "U_tokens.safetensors", {"kind": "attribution_U"})
    assert float(e["share"].sum()) == pytest.approx(x_dot_v, rel=1e-4)  # forward vs reverse mode: float tolerance
    assert float(e["direct"].sum()) == pytest.approx(float(e["share"].sum()), rel=1e-9)
    assert float(u["share"].sum()) == pytest.approx(x_dot_v, rel=1e-4)  # SGD: exactly additive over U tokens
    assert {"prompt_id", "response", "position", "token_id", "share", "entropy", "log_q"} <= set(e)
    attributed = summary["attribution"]
    assert attributed["U"]["X_dot_JY"] == pytest.approx(x_dot_v, rel=1e-4)
    text = (results / "attribution.txt").read_text()
    assert "E responses lowering the entropy most" in text and "U responses pushing the entropy down most" in text
    assert text.count("<eos>") >= 10  # decoded responses (the toy's EOS is shown)
    assert "Cov(log π, A)" in text and "Cov(log π, π·A)" in text and "Spearman" in text
    header = next(line for line in text.splitlines() if "cov" in line and "share" in line and "prompt -> response" in line)
    assert header.split().index("cov") == header.split().index("share") + 2  # the covariance column, beside
    cov = attributed["U"]["covariance"]["cov_logp_A"]
    assert cov["se"] > 0 and abs(cov["cov"]) < 10


def test_variant_table_and_plot(probe_dir, summary):
    results = probe_dir / "results"
    names = ["main", *sorted(RUN_VARIANTS)]  # variants in name order (entropy_probe.variants.names)
    compared = summary["variants"]
    assert [r["name"] for r in compared] == names
    assert compared[0]["X_dot_v"] == summary["first_order"]["X_dot_v"]
    measuring = {"main"} | {name for name, rule in RUN_SETTINGS["update"]["variants"].items() if rule.get("snis")}
    for r in compared:  # ΔH where it is measured (the main update, the variants with snis: true), δH₁ everywhere
        assert [row["eta"] for row in r["rows"]] == ETAS and all("delta_h1" in row for row in r["rows"])
        assert all(("delta_h" in row) == (r["name"] in measuring) for row in r["rows"]), r["name"]
    for name in RUN_VARIANTS:
        assert (results / "variants" / name / "delta_h_snis.json").exists() == (name in measuring)
    table = (results / "variants.txt").read_text()
    assert all(f"\n{name} " in table for name in names)
    assert (results / "variants.png").stat().st_size > 10_000
