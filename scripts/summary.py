"""Stage: the final report: summary.json (every number, the config values that define them,
version, git commit, model fingerprint), summary.txt (the table, also printed) and plot.png; with
update variants (update.variants) also variants.txt and variants.png, which compare them.
The columns: δH₁ (first order), ΔH with θ's nucleus (SNIS), ΔH of the sampler (fresh rollouts,
when estimator.fresh_etas is not []) and, on the embedded policy, the exact values of both ΔH.

The U-batch SE of δH₁ comes from the attribution stage (influence over U prompt groups); the
delete-one-U-shard jackknife stays in summary.json as a check (and, for AdamW, as the check of the
linearized step). With update.optimizer checkpoint_diff there is no U batch behind v (no U SE,
jackknife, U objective or attribution); where the checkpoint has its optimizer state, the probe's
own AdamW step is compared with the trainer's (step_comparison.json).

By hand:  python scripts/summary.py CONFIG.yaml DELTA_H1.json DELTA_H_SNIS.json SUMMARY.json SUMMARY.txt PLOT.png
          --directional DIRECTIONAL_SHARD... --snis SNIS_SHARD... [--jackknife_path U_JACKKNIFE.json]
          [--objective_path U_OBJECTIVE.safetensors] [--attribution_path ATTRIBUTION.json]
          [--comparison_path STEP_COMPARISON.json] [--sampler_path DELTA_H_SAMPLER.json] [--exact_path EXACT.json]
          (update variants: through Snakemake)
"""

from entropy_probe import (attribution, first_order, gradients, linearity, normalization, precision, report, shards,
                           variant_report, variants)
from entropy_probe import snis as snis_module
from entropy_probe.stage import run_stage
from entropy_probe.stage_keys import STAGE_KEYS, nest


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


def compare_variants(config: dict, first_order_main: dict, snis_main: dict, main_v_meta: dict, x_path: str,
                     variant_inputs: list[tuple[str, str, list[str], list[str]]]) -> list[dict]:
    """The main update and each variant (name, v, directional shards, SNIS shards): X·v ± SE, |v|,
    and δH₁ beside the SNIS ΔH per η."""
    G, norm, etas = config["batch_config"]["G"], config["estimator"]["normalization"], config["estimator"]["eta_list"]
    entropy = config["estimator"]["entropy"]
    x_tensors, x_meta = shards.read_shard(x_path, {"kind": "X"})
    X, _ = gradients.unpack(x_tensors)
    upd = config["update"]
    results = [variant_report.variant_result("main", f"loss_type={upd['loss_type']}, optimizer={upd['optimizer']}",
                                     first_order_main, snis_main, main_v_meta)]
    for name, v_path, directional_paths, snis_paths in variant_inputs:
        v, v_meta = shards.read_shard(v_path, {"kind": "v", "model_fingerprint": x_meta["model_fingerprint"]})
        expect = {"kind": "directional", "model_fingerprint": x_meta["model_fingerprint"], "normalization": norm,
                  "entropy": entropy}
        directional = [shards.read_shard(p, expect)[0] for p in directional_paths]
        fo = first_order.first_order_report(X, v, directional, G, norm, etas, precision=x_meta["precision"])
        measured = snis_module.delta_h_sweep([shards.read_shard(p, {"kind": "snis"}) for p in snis_paths], G, norm,
                                             entropy)
        results.append(variant_report.variant_result(name, variants.describe(config, name), fo, measured, v_meta))
    return results


def main(cfg: dict, delta_h1_path: str, snis_path: str, json_path: str, table_path: str, plot_path: str,
         directional: list[str], snis: list[str], jackknife_path: str | None = None,
         objective_path: str | None = None, exact_path: str | None = None, comparison_path: str | None = None,
         sampler_path: str | None = None, attribution_path: str | None = None, x_path: str | None = None,
         main_v_path: str | None = None, variant_paths=([], [], []), variants_table_path: str | None = None,
         variants_plot_path: str | None = None) -> None:
    config = _defining_only(cfg)
    first_order_main, measured = shards.read_json(delta_h1_path), shards.read_json(snis_path)
    attributed = shards.read_json(attribution_path) if attribution_path else None
    jackknife = shards.read_json(jackknife_path) if jackknife_path else None
    objective = shards.read_metadata(objective_path) if objective_path else None
    exact = shards.read_json(exact_path) if exact_path else None
    sampler = shards.read_json(sampler_path) if sampler_path else None
    comparison = shards.read_json(comparison_path) if comparison_path else None
    fingerprint = first_order_main["model_fingerprint"]
    for path, other in ((snis_path, measured), (sampler_path, sampler), (attribution_path, attributed)):
        if other is not None and other["model_fingerprint"] != fingerprint:
            raise shards.ShardError(f"{delta_h1_path} and {path} come from different models")
    if first_order_main["precision"] != measured["precision"]:
        raise shards.ShardError(f"{delta_h1_path} ({first_order_main['precision']}) and {snis_path} "
                                f"({measured['precision']}) come from passes in different precisions")
    entropy = config["estimator"]["entropy"]
    for path, other in ((snis_path, measured), (sampler_path, sampler), (exact_path, exact)):
        if other is not None and other.get("entropy", "sampler") != entropy:
            raise shards.ShardError(f"{path}: the {other.get('entropy')!r} entropy, expected {entropy!r}")
    directional_sums = [shards.read_shard(p, {"kind": "directional", "model_fingerprint": fingerprint})[0]
                        for p in directional]
    snis_tensors = [shards.read_shard(p, {"kind": "snis", "model_fingerprint": fingerprint})[0]
                    for p in snis]
    ratios = linearity.linearity(directional_sums, snis_tensors, [r["eta"] for r in measured["rows"]],
                                 config["batch_config"]["G"], first_order_main["normalization"], entropy)
    exact_by_eta = {r["eta"]: r for r in exact["delta_h"]} if exact else None
    se_u = attributed["U"]["se_u"] if attributed else None
    rows = report.combine(first_order_main, measured, se_u, exact_by_eta, sampler, ratios)
    u_batch = None if objective is None else {
        "informative_groups": objective["informative_groups"], "num_groups": objective["num_groups"],
        "loss_type": objective["loss_type"], "loss_formula": objective["loss_formula"]}
    unit = normalization.get(first_order_main["normalization"]).unit
    table = report.format_table(rows, unit, u_batch, entropy, snis_module.MIN_ESS_FRACTION,
                                first_order_main.get("update"), comparison)
    table += (f"precision: {first_order_main['precision']} model passes, fp32 measure (softmax, entropies), float64 "
              "reductions\n")
    with shards.atomic_path(plot_path, suffix=".png") as tmp:
        report.plot(rows, tmp, unit)
    compared = None
    variant_inputs = _variant_inputs(variants.names(config), *variant_paths)
    if variant_inputs:
        main_v_meta = shards.read_metadata(main_v_path)
        compared = compare_variants(config, first_order_main, measured, main_v_meta, x_path, variant_inputs)
        with shards.atomic_path(variants_table_path) as tmp:
            tmp.write_text(variant_report.format_variants(compared, unit))
        with shards.atomic_path(variants_plot_path, suffix=".png") as tmp:
            variant_report.plot_variants(compared, tmp, unit)
    shards.write_json(json_path, {
        "rows": rows, "columns": report.COLUMNS, "entropy": entropy, "first_order": first_order_main,
        "delta_h_snis": measured, "delta_h_sampler": sampler, "u_jackknife": jackknife,
        "u_noise": u_noise_check(attributed, jackknife) if attributed else None,
        "attribution": robust_attribution(attributed) if attributed else None, "variants": compared,
        "exact": exact, "u_batch": u_batch, "unit": unit, "model_fingerprint": fingerprint,
        "update": first_order_main.get("update"), "step_comparison": comparison,
        "precision": precision.describe(first_order_main["precision"]) | {"tokens_outside_recomputed_nucleus": {
            **first_order_main["tokens_outside_recomputed_nucleus"],
            "snis": measured["tokens_outside_recomputed_nucleus"]}},
        "config": config,
        **report.provenance(),
    })
    with shards.atomic_path(table_path) as tmp:
        tmp.write_text(table)
    print(table)


def _defining_only(config: dict) -> dict:
    """The config summary.json records: every defining value (entropy_probe.stage_keys), no
    execution knob (they change no number)."""
    defining = nest(dict.fromkeys(STAGE_KEYS["summary"]))
    return {section: {k: config[section][k] for k in keys} for section, keys in defining.items()}


def _variant_inputs(names: list[str], v_paths: list[str], directional: list[str], snis_paths: list[str]):
    """Regroup the rule's flat per-variant input lists (variants in :func:`variants.names` order,
    shards inside), checking that every path is its variant's."""
    if not names:
        return []
    if len(v_paths) != len(names):
        raise shards.ShardError(f"update.variants names {len(names)} variants ({', '.join(names)}) but "
                                f"{len(v_paths)} variant v files were given (the rule gives them; by hand, "
                                "compare variants through Snakemake or set update.variants: {})")
    k = len(directional) // len(names)
    grouped = [(name, v_paths[i], directional[i * k:(i + 1) * k], snis_paths[i * k:(i + 1) * k])
               for i, name in enumerate(names)]
    for name, v_path, d_paths, s_paths in grouped:
        if any(f"/variants/{name}/" not in str(p) for p in [v_path, *d_paths, *s_paths]):
            raise shards.ShardError(f"summary inputs out of order: variant {name!r} got {v_path}, {d_paths}, {s_paths}")
    return grouped


run_stage(globals(), main, ["delta_h1_path", "snis_path", "json_path", "table_path", "plot_path",
                            ("--directional", "the directional shards, in E-shard order", {"nargs": "+", "required": True}),
                            ("--snis", "the SNIS shards, in E-shard order", {"nargs": "+", "required": True}),
                            ("--jackknife_path", "u_jackknife JSON (v from a U batch)"),
                            ("--objective_path", "u_objective shard (v from a U batch)"),
                            ("--exact_path", "exact_reference JSON (embedded policy only)"),
                            ("--comparison_path", "step_comparison JSON (checkpoint_diff with an optimizer state)"),
                            ("--sampler_path", "delta_h_sampler JSON (fresh rollouts)"),
                            ("--attribution_path", "attribution JSON (the U-batch SE of δH₁)")],
          lambda smk: {"delta_h1_path": smk.input.delta_h1, "snis_path": smk.input.delta_h_snis,
                       "directional": list(smk.input.directional), "snis": list(smk.input.snis),
                       "jackknife_path": smk.input.get("u_jackknife"), "objective_path": smk.input.get("u_objective"),
                       "json_path": smk.output.json, "table_path": smk.output.table, "plot_path": smk.output.plot,
                       "exact_path": smk.input.get("exact"), "comparison_path": smk.input.get("step_comparison"),
                       "sampler_path": smk.input.get("delta_h_sampler"),
                       "attribution_path": smk.input.get("attribution"), "x_path": smk.input.get("X"),
                       "main_v_path": smk.input.get("v"),
                       "variant_paths": (list(smk.input.get("variant_v", [])),
                                         list(smk.input.get("variant_directional", [])),
                                         list(smk.input.get("variant_snis", []))),
                       "variants_table_path": smk.output.get("variants_table"),
                       "variants_plot_path": smk.output.get("variants_plot")},
          stage="summary")
