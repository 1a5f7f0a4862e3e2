"""Stage: the final report: summary.json (every number, the config values that define them,
version, git commit, model fingerprint), summary.txt (the table, also printed) and plot.png; with
update variants (update.variants) also variants.txt and variants.png, which compare them.

The U-batch SE of δH₁ comes from the attribution stage (influence over U prompt groups); the
delete-one-U-shard jackknife stays in summary.json as a check (and, for AdamW, as the check of the
linearized step).

By hand:  python scripts/summary.py CONFIG.yaml DELTA_H1.json DELTA_H_SNIS.json U_JACKKNIFE.json U_OBJECTIVE.safetensors
              ATTRIBUTION.json OUT_DIR [--exact EXACT.json] [--x X.safetensors --variant NAME V DIRECTIONAL... -- SNIS...]
"""
import argparse
from pathlib import Path

from entropy_probe import attribution, first_order, gradients, normalization, report, shards, snis, variants
from entropy_probe.stage import config_for, rule_config, stage_run
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
    x_tensors, x_meta = shards.read_shard(x_path, {"kind": "X"})
    X, _ = gradients.unpack(x_tensors)
    upd = config["update"]
    results = [report.variant_result("main", f"loss_type={upd['loss_type']}, optimizer={upd['optimizer']}",
                                     first_order_main, snis_main, main_v_meta)]
    for name, v_path, directional_paths, snis_paths in variant_inputs:
        v, v_meta = shards.read_shard(v_path, {"kind": "v", "model_fingerprint": x_meta["model_fingerprint"]})
        expect = {"kind": "directional", "model_fingerprint": x_meta["model_fingerprint"], "normalization": norm}
        directional = [shards.read_shard(p, expect)[0] for p in directional_paths]
        fo = first_order.first_order_report(X, v, directional, G, norm, etas)
        measured = snis.delta_h_sweep([shards.read_shard(p, {"kind": "snis"}) for p in snis_paths], G, norm)
        results.append(report.variant_result(name, variants.describe(config, name), fo, measured, v_meta))
    return results


def main(config: dict, delta_h1_path: str, snis_path: str, jackknife_path: str, objective_path: str,
         attribution_path: str, json_path: str, table_path: str, plot_path: str, exact_path: str | None = None,
         x_path: str | None = None, main_v_path: str | None = None, variant_inputs=(),
         variants_table_path: str | None = None, variants_plot_path: str | None = None) -> None:
    first_order_main, measured = shards.read_json(delta_h1_path), shards.read_json(snis_path)
    jackknife = shards.read_json(jackknife_path)
    attributed = shards.read_json(attribution_path)
    objective = shards.read_metadata(objective_path)
    exact = shards.read_json(exact_path) if exact_path else None
    fingerprints = {first_order_main["model_fingerprint"], measured["model_fingerprint"], attributed["model_fingerprint"]}
    if len(fingerprints) != 1:
        raise shards.ShardError(f"{delta_h1_path}, {snis_path} and {attribution_path} come from different models")
    exact_by_eta = {r["eta"]: r["exact_delta_h"] for r in exact["delta_h"]} if exact else None
    rows = report.combine(first_order_main, measured, attributed["U"]["se_u"], exact_by_eta)
    u_batch = {"informative_groups": objective["informative_groups"], "num_groups": objective["num_groups"],
               "loss_type": objective["loss_type"], "loss_formula": objective["loss_formula"]}
    unit = normalization.get(first_order_main["normalization"]).unit
    table = report.format_table(rows, unit, u_batch)
    with shards.atomic_path(plot_path, suffix=".png") as tmp:
        report.plot(rows, tmp, unit)
    compared = None
    if variant_inputs:
        main_v_meta = shards.read_metadata(main_v_path)
        compared = compare_variants(config, first_order_main, measured, main_v_meta, x_path, variant_inputs)
        with shards.atomic_path(variants_table_path) as tmp:
            tmp.write_text(report.format_variants(compared, unit))
        with shards.atomic_path(variants_plot_path, suffix=".png") as tmp:
            report.plot_variants(compared, tmp, unit)
    shards.write_json(json_path, {
        "rows": rows, "first_order": first_order_main, "delta_h_snis": measured, "u_jackknife": jackknife,
        "u_noise": u_noise_check(attributed, jackknife), "attribution": robust_attribution(attributed),
        "variants": compared, "exact": exact, "u_batch": u_batch, "unit": unit,
        "model_fingerprint": first_order_main["model_fingerprint"], "config": config,
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
    k = len(directional) // len(names)
    grouped = [(name, v_paths[i], directional[i * k:(i + 1) * k], snis_paths[i * k:(i + 1) * k])
               for i, name in enumerate(names)]
    for name, v_path, d_paths, s_paths in grouped:
        if any(f"/variants/{name}/" not in str(p) for p in [v_path, *d_paths, *s_paths]):
            raise shards.ShardError(f"summary inputs out of order: variant {name!r} got {v_path}, {d_paths}, {s_paths}")
    return grouped


if "snakemake" in globals():
    with stage_run(snakemake.log[0], snakemake.threads):  # noqa: F821
        inputs, outputs = snakemake.input, snakemake.output  # noqa: F821
        config = _defining_only(rule_config(snakemake))  # noqa: F821
        names = variants.names(config)
        main(config, inputs.delta_h1, inputs.delta_h_snis, inputs.u_jackknife, inputs.u_objective, inputs.attribution,
             outputs.json, outputs.table, outputs.plot, inputs.get("exact"), inputs.get("X"), inputs.get("v"),
             _variant_inputs(names, list(inputs.get("variant_v", [])), list(inputs.get("variant_directional", [])),
                             list(inputs.get("variant_snis", []))),
             outputs.get("variants_table"), outputs.get("variants_plot"))
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("config", "delta_h1", "delta_h_snis", "u_jackknife", "u_objective", "attribution", "out_dir"):
        parser.add_argument(name)
    parser.add_argument("--exact", help="exact_reference JSON (embedded policy only)")
    parser.add_argument("--x", help="the reduced X (needed with --variant)")
    parser.add_argument("--v", help="the main v (needed with --variant)")
    parser.add_argument("--variant", nargs="+", action="append", default=[],
                        help="NAME V_PATH then its directional and SNIS shards, as d:PATH and s:PATH")
    args = parser.parse_args()
    variant_inputs = [(v[0], v[1], [p[2:] for p in v[2:] if p.startswith("d:")], [p[2:] for p in v[2:] if p.startswith("s:")])
                      for v in args.variant]
    with stage_run():
        out = Path(args.out_dir)
        main(_defining_only(config_for(args.config, "summary")), args.delta_h1, args.delta_h_snis, args.u_jackknife,
             args.u_objective, args.attribution, out / "summary.json", out / "summary.txt", out / "plot.png",
             args.exact, args.x, args.v, variant_inputs, out / "variants.txt", out / "variants.png")
