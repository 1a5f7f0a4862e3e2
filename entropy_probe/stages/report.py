"""The report: summary.json (every number, the config values that define them, provenance),
summary.txt (the table a person reads), plot.png and the report's landing page; the update
variants compared (their δH₁ and ΔH from the main reductions, run here once per variant); and
over a trainer's run, the trajectory."""
from __future__ import annotations

from typing import Annotated

from pathlib import Path

from .. import (attribution, job_cost, linearity, normalization, precision, report, report_page, shards, trajectory_report,
                variant_report, variants)
from ..entropies import ENTROPY_KINDS
from ..snis import MIN_ESS_FRACTION
from ..stage import In, Out
from ..stage_keys import STAGE_KEYS, nest
from .statistics import first_order_of, snis_of


def robust_attribution(attributed: dict) -> dict:
    """The attribution numbers summary.json keeps: continuous in the inputs (no ranks, no lists of
    top responses, no bin counts: those are in attribution/attribution.json)."""
    e, u = attributed["E"], attributed["U"]
    cov = u["covariance"]
    return {
        "E": {k: e[k] for k in ("X_dot_v", "components", "top_token_fraction", "num_tokens")},
        "U": {k: u[k] for k in ("optimizer", "X_dot_v", "X_dot_JY", "intercept", "se_u", "degrees_of_freedom",
                                "top_token_fraction", "num_tokens")}
        | {"covariance": {"cov_logp_A": cov["cov_logp_A"], "cov_logp_pA": cov["cov_logp_pA"]}
           | {k: v for k, v in cov.items() if k.startswith("top_")}},
    }


def u_noise_check(attributed: dict, jackknife: dict) -> dict:
    """The influence U SE against the jackknife over U shards (the check), and the linearized step
    against the jackknife's exact leave-one-shard-out values."""
    u = attributed["U"]
    out = {"se_influence": u["se_u"], "degrees_of_freedom": u["degrees_of_freedom"], "source": report.U_SE_SOURCE,
           "jackknife_available": jackknife["available"]}
    if jackknife["available"]:
        out |= {"se_jackknife": jackknife["X_dot_v_se_u"], "jackknife_degrees_of_freedom": jackknife["num_u_shards"] - 1}
        out["linearization"] = attribution.linearization_check(u["X_dot_v"], u["X_dot_JY"], u["shard_sums"],
                                                               jackknife["X_dot_v_leave_one_shard_out"])
    return out


def _defining_only(config: dict) -> dict:
    """The config summary.json records: every defining value (entropy_probe.stage_keys), no
    execution knob (they change no number)."""
    defining = nest(dict.fromkeys(STAGE_KEYS["summary"]))
    return {section: {k: config[section][k] for k in keys} for section, keys in defining.items()}


def _check_sources(fingerprint: str, precision_name: str, entropy: str, sources: dict[str, dict | None]) -> None:
    """The reports a summary combines come from one model, one precision and one entropy."""
    for path, other in sources.items():
        if other is None:
            continue
        if other.get("model_fingerprint", fingerprint) != fingerprint:
            raise shards.ShardError(f"{path}: from another model ({other['model_fingerprint']}, not {fingerprint})")
        if other.get("precision", precision_name) != precision_name:
            raise shards.ShardError(f"{path}: from passes in {other['precision']}, not {precision_name}")
        if other.get("entropy", entropy) != entropy:
            raise shards.ShardError(f"{path}: the {other.get('entropy')!r} entropy, expected {entropy!r}")


def _linearity(cfg: dict, first: dict, measured: dict, directional: list[str], snis: list[str]) -> dict:
    """δH₁/ΔH with its delta-method SE per η, from the per-group sums of the directional pass and
    the per-sequence SNIS values of the same E batch."""
    fingerprint, entropy = first["model_fingerprint"], cfg["estimator"]["entropy"]
    sums = shards.read_set(directional, {"kind": "directional", "model_fingerprint": fingerprint})
    weights = shards.read_set(snis, {"kind": "snis", "model_fingerprint": fingerprint}, agree=("etas",))
    S_field, S_shifted_field = ENTROPY_KINDS[entropy].snis_fields
    return linearity.linearity({k: sums.cat(k) for k in ("P", "Q", "S", "T")}, [float(e) for e in weights.common["etas"]],
                               weights.cat("log_w", -1), weights.cat(S_shifted_field, -1), weights.cat(S_field, -1),
                               weights.cat("T", -1), [r["eta"] for r in measured["rows"]], cfg["batch_config"]["G"],
                               first["normalization"])


def compare_variants(cfg: dict, first: dict, measured: dict, X: str, v: str, variant_v: list[str],
                     variant_directional: list[str], variant_snis: list[str], variant_delta_h1: list[str],
                     variant_delta_h_snis: list[str]) -> list[dict]:
    """The main update and each variant: X·v ± SE, |v|, and δH₁ beside the SNIS ΔH per η (for the
    variants with ``snis: true``), each variant's from the main stages' reductions (written beside
    its v)."""
    names, measuring = variants.names(cfg), variants.with_snis(cfg)
    if len(variant_v) != len(names) or len(variant_delta_h1) != len(names) or len(variant_delta_h_snis) != len(measuring):
        raise shards.ShardError(f"update.variants names {len(names)} variants ({', '.join(names)}), "
                                f"{len(measuring)} with snis, but {len(variant_v)} variant v files and "
                                f"{len(variant_delta_h_snis)} SNIS reports were given")
    k = len(variant_directional) // len(names)
    upd = cfg["update"]
    results = [variant_report.variant_result("main", f"loss_type={upd['loss_type']}, optimizer={upd['optimizer']}",
                                             first, measured, shards.read_metadata(v))]
    for i, name in enumerate(names):
        j = measuring.index(name) if name in measuring else None
        own = [variant_v[i], *variant_directional[i * k:(i + 1) * k], variant_delta_h1[i]]
        if j is not None:
            own += [*variant_snis[j * k:(j + 1) * k], variant_delta_h_snis[j]]
        if any(f"/variants/{name}/" not in str(p) for p in own):
            raise shards.ShardError(f"summary inputs out of order: variant {name!r} got {own}")
        first_v = first_order_of(cfg, X, variant_v[i], variant_directional[i * k:(i + 1) * k])
        shards.write_json(variant_delta_h1[i], first_v)
        measured_v = None
        if j is not None:
            measured_v = snis_of(cfg, variant_snis[j * k:(j + 1) * k])
            shards.write_json(variant_delta_h_snis[j], measured_v)
        results.append(variant_report.variant_result(name, variants.describe(cfg, name), first_v, measured_v,
                                                     shards.read_metadata(variant_v[i])))
    return results


def summary(cfg: dict, *, delta_h1: Annotated[str, In("results/delta_h1.json")], delta_h_snis: Annotated[str, In("results/delta_h_snis.json")],
            directional: Annotated[list[str], In("every directional shard, in E-shard order")],
            snis: Annotated[list[str], In("every SNIS shard, in E-shard order")],
            summary_json: Annotated[str, Out("results/summary.json")], summary_table: Annotated[str, Out("results/summary.txt")],
            summary_plot: Annotated[str, Out("results/plot.png")], landing: Annotated[str, Out("results/report/landing.rst")],
            exact: Annotated[str, In("results/estimates/exact.json (the embedded policy)")] = None,
            u_jackknife: Annotated[str, In("results/estimates/u_jackknife.json (v from a U batch)")] = None,
            u_objective: Annotated[str, In("results/estimates/u_objective.safetensors (v from a U batch)")] = None,
            attribution_summary: Annotated[str, In("results/attribution/attribution.json (v from a U batch)")] = None,
            step_comparison: Annotated[str, In("results/update/step_comparison.json (checkpoint_diff with a state)")] = None,
            delta_h_sampler: Annotated[str, In("results/delta_h_sampler.json (fresh rollouts)")] = None,
            X: Annotated[str, In("the reduced X (update variants)")] = None, v: Annotated[str, In("the main v (update variants)")] = None,
            variant_v: Annotated[list[str], In("each variant's v")] = (), variant_directional: Annotated[list[str], In("each variant's directional shards")] = (),
            variant_snis: Annotated[list[str], In("each variant's SNIS shards")] = (),
            costed: Annotated[list[str], In("the other files holding model jobs' costs: rollouts, reduced gradients, "
                                            "fresh rollouts")] = (),
            variant_delta_h1: Annotated[list[str], Out("each variant's delta_h1.json")] = (),
            variant_delta_h_snis: Annotated[list[str], Out("each variant's delta_h_snis.json")] = (),
            variants_table: Annotated[str, Out("results/variants.txt")] = None, variants_plot: Annotated[str, Out("results/variants.png")] = None
            ) -> None:
    """The final report. Per η: δH₁ (first order) with its E-side and, from the attribution, its
    U-side SE; ΔH with θ's nucleus (SNIS); the linearity ratio δH₁/ΔH; ΔH of the sampler (fresh
    rollouts); the exact values of both ΔH on the embedded policy. With update.variants also
    variants.txt and variants.png. With update.optimizer checkpoint_diff there is no U batch behind
    v (no U SE, jackknife, U objective or attribution); where the checkpoint has its optimizer
    state, the probe's own AdamW step is compared with the trainer's."""
    config = _defining_only(cfg)
    entropy = config["estimator"]["entropy"]
    first, measured = shards.read_json(delta_h1), shards.read_json(delta_h_snis)
    read = {name: shards.read_json(path) if path else None for name, path in (
        ("attribution", attribution_summary), ("jackknife", u_jackknife), ("exact", exact),
        ("sampler", delta_h_sampler), ("comparison", step_comparison))}
    objective = shards.read_metadata(u_objective) if u_objective else None
    _check_sources(first["model_fingerprint"], first["precision"], entropy,
                   {delta_h_snis: measured, delta_h_sampler: read["sampler"], attribution_summary: read["attribution"],
                    exact: read["exact"]})
    ratios = _linearity(cfg, first, measured, directional, snis)
    exact_by_eta = {r["eta"]: r for r in read["exact"]["delta_h"]} if read["exact"] else None
    attributed = read["attribution"]
    rows = report.combine(first, measured, attributed["U"]["se_u"] if attributed else None, exact_by_eta,
                          read["sampler"], ratios)
    u_batch = None if objective is None else {
        "informative_groups": objective["informative_groups"], "num_groups": objective["num_groups"],
        "loss_type": objective["loss_type"], "loss_formula": objective["loss_formula"]}
    unit = normalization.get(first["normalization"]).unit
    notes = [report.u_batch_note(u_batch) if u_batch else "", report.update_note(first.get("update"), read["comparison"]),
             variants.skipped_note(cfg) or "",
             f"precision: {first['precision']} model passes, fp32 measure (softmax, entropies), float64 reductions"]
    table = report.format_table(rows, unit, entropy, MIN_ESS_FRACTION, notes)
    with shards.atomic_path(summary_plot, suffix=".png") as tmp:
        report.plot(rows, tmp, unit)
    shards.write_text(landing, report_page.summary_page(rows, unit, entropy, Path(summary_plot).read_bytes(),
                                                        [report.flag_note(rows, MIN_ESS_FRACTION), *notes]))
    compared = None
    if variants.names(cfg):
        compared = compare_variants(cfg, first, measured, X, v, list(variant_v), list(variant_directional),
                                    list(variant_snis), list(variant_delta_h1), list(variant_delta_h_snis))
        shards.write_text(variants_table, variant_report.format_variants(compared, unit))
        with shards.atomic_path(variants_plot, suffix=".png") as tmp:
            variant_report.plot_variants(compared, tmp, unit)
    shards.write_json(summary_json, {
        "rows": rows, "columns": report.COLUMNS, "entropy": entropy, "first_order": first,
        "delta_h_snis": measured, "delta_h_sampler": read["sampler"], "u_jackknife": read["jackknife"],
        "u_noise": u_noise_check(attributed, read["jackknife"]) if attributed else None,
        "attribution": robust_attribution(attributed) if attributed else None, "variants": compared,
        "variants_skipped": variants.skipped_note(cfg), "exact": read["exact"], "u_batch": u_batch, "unit": unit,
        "model_fingerprint": first["model_fingerprint"], "update": first.get("update"),
        "step_comparison": read["comparison"],
        "precision": precision.describe(first["precision"]) | {"tokens_outside_recomputed_nucleus": {
            **first["tokens_outside_recomputed_nucleus"], "snis": measured["tokens_outside_recomputed_nucleus"]}},
        "cost": cost_account([*costed, *directional, *snis, *filter(None, [attribution_summary]),
                              *variant_directional, *variant_snis]),
        "config": config,
        **report.provenance(),
    })
    shards.write_text(summary_table, table)
    print(table)


def cost_account(paths: list[str]) -> dict:
    """What the run's model jobs cost, per stage (:func:`entropy_probe.job_cost.by_stage`), from
    the costs recorded in ``paths``; ``not_recorded``: files written without one."""
    costs, missing = [], []
    for path in paths:
        meta = shards.read_json(path) if path.endswith(".json") else shards.read_metadata(path)
        for cost in job_cost.recorded(meta):
            if cost is None:
                missing.append(path)
            else:
                costs.append(cost)
    return job_cost.by_stage(costs) | {"not_recorded": sorted(set(missing))}


def trajectory(*, summaries: Annotated[list[str], In("every pair's summary.json, in training order")],
               trajectory_json: Annotated[str, Out("results/trajectory.json")], trajectory_table: Annotated[str, Out("results/trajectory.txt")],
               trajectory_plot: Annotated[str, Out("results/trajectory.png")],
               landing: Annotated[str, Out("results/report/trajectory.rst")]) -> None:
    """The report over training (model.checkpoints) from every pair's summary: the rows and every
    pair's summary (JSON), the table (also printed), the plot and the report's landing page."""
    read = [(Path(p).parent.name, shards.read_json(p)) for p in summaries]
    units = {s["unit"] for _, s in read}
    if len(units) != 1:
        raise shards.ShardError(f"the pairs' summaries have different units {sorted(units)}: {summaries}")
    unit = units.pop()
    rows = trajectory_report.trajectory_rows(read)
    table = trajectory_report.format_table(rows, unit)
    with shards.atomic_path(trajectory_plot, suffix=".png") as tmp:
        trajectory_report.plot(rows, tmp, unit)
    shards.write_text(landing, report_page.trajectory_page(rows, unit, Path(trajectory_plot).read_bytes()))
    shards.write_json(trajectory_json, {"rows": rows, "unit": unit, "pairs": dict(read), **report.provenance()})
    shards.write_text(trajectory_table, table)
    print(table)
