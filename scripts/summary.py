"""Stage: the final report: summary.json (every number, the config values that define them,
version, git commit, model fingerprint), summary.txt (the table, also printed) and plot.png.
The columns: δH₁ (first order), ΔH with θ's nucleus (SNIS), ΔH of the sampler (fresh rollouts,
when estimator.fresh_etas is not []) and, on the embedded policy, the exact values of both ΔH.

By hand:  python scripts/summary.py CONFIG.yaml DELTA_H1.json DELTA_H_SNIS.json U_JACKKNIFE.json U_OBJECTIVE.safetensors OUT_DIR \\
              --directional DIRECTIONAL_SHARD... --snis SNIS_SHARD... [--sampler DELTA_H_SAMPLER.json] [--exact EXACT.json]
"""
import argparse
from pathlib import Path

from entropy_probe import linearity, normalization, report, shards, snis
from entropy_probe.stage import config_for, rule_config, stage_run
from entropy_probe.stage_keys import STAGE_KEYS, nest


def main(config: dict, delta_h1_path: str, snis_path: str, jackknife_path: str, objective_path: str, json_path: str,
         table_path: str, plot_path: str, directional_paths: list[str], snis_shard_paths: list[str],
         exact_path: str | None = None, sampler_path: str | None = None) -> None:
    first_order, measured = shards.read_json(delta_h1_path), shards.read_json(snis_path)
    jackknife = shards.read_json(jackknife_path)
    objective = shards.read_metadata(objective_path)
    exact = shards.read_json(exact_path) if exact_path else None
    sampler = shards.read_json(sampler_path) if sampler_path else None
    fingerprint = first_order["model_fingerprint"]
    for path, other in ((snis_path, measured), (sampler_path, sampler)):
        if other is not None and other["model_fingerprint"] != fingerprint:
            raise shards.ShardError(f"{delta_h1_path} and {path} come from different models")
    entropy = config["estimator"]["entropy"]
    for path, other in ((snis_path, measured), (sampler_path, sampler), (exact_path, exact)):
        if other is not None and other.get("entropy", "sampler") != entropy:
            raise shards.ShardError(f"{path}: the {other.get('entropy')!r} entropy, expected {entropy!r}")
    directional = [shards.read_shard(p, {"kind": "directional", "model_fingerprint": fingerprint})[0]
                   for p in directional_paths]
    snis_tensors = [shards.read_shard(p, {"kind": "snis", "model_fingerprint": fingerprint})[0]
                    for p in snis_shard_paths]
    ratios = linearity.linearity(directional, snis_tensors, [r["eta"] for r in measured["rows"]],
                                 config["batch_config"]["G"], first_order["normalization"], entropy)
    exact_by_eta = {r["eta"]: r for r in exact["delta_h"]} if exact else None
    rows = report.combine(first_order, measured, jackknife, exact_by_eta, sampler, ratios)
    u_batch = {"informative_groups": objective["informative_groups"], "num_groups": objective["num_groups"],
               "loss_type": objective["loss_type"], "loss_formula": objective["loss_formula"]}
    unit = normalization.get(first_order["normalization"]).unit
    table = report.format_table(rows, unit, u_batch, entropy, snis.MIN_ESS_FRACTION)
    with shards.atomic_path(plot_path, suffix=".png") as tmp:
        report.plot(rows, tmp, unit)
    shards.write_json(json_path, {
        "rows": rows, "columns": report.COLUMNS, "entropy": entropy, "first_order": first_order,
        "delta_h_snis": measured, "delta_h_sampler": sampler, "u_jackknife": jackknife, "exact": exact,
        "u_batch": u_batch, "unit": unit, "model_fingerprint": fingerprint, "config": config,
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


if "snakemake" in globals():
    with stage_run(snakemake.log[0], snakemake.threads):  # noqa: F821
        inputs, outputs = snakemake.input, snakemake.output  # noqa: F821
        main(_defining_only(rule_config(snakemake)), inputs.delta_h1, inputs.delta_h_snis,  # noqa: F821
             inputs.u_jackknife, inputs.u_objective, outputs.json, outputs.table, outputs.plot,
             list(inputs.directional), list(inputs.snis), inputs.get("exact"), inputs.get("delta_h_sampler"))
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("delta_h1")
    parser.add_argument("delta_h_snis")
    parser.add_argument("u_jackknife")
    parser.add_argument("u_objective")
    parser.add_argument("out_dir")
    parser.add_argument("--directional", nargs="+", required=True, help="the directional shards, in E-shard order")
    parser.add_argument("--snis", nargs="+", required=True, help="the SNIS shards, in E-shard order")
    parser.add_argument("--sampler", help="delta_h_sampler JSON (fresh rollouts)")
    parser.add_argument("--exact", help="exact_reference JSON (embedded policy only)")
    args = parser.parse_args()
    with stage_run():
        out = Path(args.out_dir)
        main(_defining_only(config_for(args.config, "summary")), args.delta_h1, args.delta_h_snis, args.u_jackknife,
             args.u_objective, out / "summary.json", out / "summary.txt", out / "plot.png", args.directional,
             args.snis, args.exact, args.sampler)
