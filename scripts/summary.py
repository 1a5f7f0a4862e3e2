"""Stage: the final report: summary.json (every number, the config values that define them,
version, git commit, model fingerprint), summary.txt (the table, also printed) and plot.png.
With update.optimizer checkpoint_diff there is no U batch behind v (no jackknife, no U objective);
where the checkpoint has its optimizer state, the probe's own AdamW step is compared with the
trainer's (step_comparison.json).

By hand:  python scripts/summary.py CONFIG.yaml DELTA_H1.json DELTA_H_SNIS.json OUT_DIR [--u-jackknife U_JACKKNIFE.json]
          [--u-objective U_OBJECTIVE.safetensors] [--step-comparison STEP_COMPARISON.json] [--exact EXACT.json]
"""
import argparse
from pathlib import Path

from entropy_probe import normalization, report, shards
from entropy_probe.stage import config_for, rule_config, stage_run
from entropy_probe.stage_keys import STAGE_KEYS, nest


def main(config: dict, delta_h1_path: str, snis_path: str, jackknife_path: str | None, objective_path: str | None,
         json_path: str, table_path: str, plot_path: str, exact_path: str | None = None,
         comparison_path: str | None = None) -> None:
    first_order, measured = shards.read_json(delta_h1_path), shards.read_json(snis_path)
    jackknife = shards.read_json(jackknife_path) if jackknife_path else None
    objective = shards.read_metadata(objective_path) if objective_path else None
    exact = shards.read_json(exact_path) if exact_path else None
    comparison = shards.read_json(comparison_path) if comparison_path else None
    if first_order["model_fingerprint"] != measured["model_fingerprint"]:
        raise shards.ShardError(f"{delta_h1_path} and {snis_path} come from different models")
    exact_by_eta = {r["eta"]: r["exact_delta_h"] for r in exact["delta_h"]} if exact else None
    rows = report.combine(first_order, measured, jackknife, exact_by_eta)
    u_batch = None if objective is None else {
        "informative_groups": objective["informative_groups"], "num_groups": objective["num_groups"],
        "loss_type": objective["loss_type"], "loss_formula": objective["loss_formula"]}
    unit = normalization.get(first_order["normalization"]).unit
    table = report.format_table(rows, unit, u_batch, first_order.get("update"), comparison)
    with shards.atomic_path(plot_path, suffix=".png") as tmp:
        report.plot(rows, tmp, unit)
    shards.write_json(json_path, {
        "rows": rows, "first_order": first_order, "delta_h_snis": measured, "u_jackknife": jackknife, "exact": exact,
        "u_batch": u_batch, "unit": unit, "model_fingerprint": first_order["model_fingerprint"],
        "update": first_order.get("update"), "step_comparison": comparison,
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


if "snakemake" in globals():
    with stage_run(snakemake.log[0], snakemake.threads):  # noqa: F821
        inputs, outputs = snakemake.input, snakemake.output  # noqa: F821
        main(_defining_only(rule_config(snakemake)), inputs.delta_h1, inputs.delta_h_snis,  # noqa: F821
             inputs.get("u_jackknife"), inputs.get("u_objective"), outputs.json, outputs.table, outputs.plot,
             inputs.get("exact"), inputs.get("step_comparison"))
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("delta_h1")
    parser.add_argument("delta_h_snis")
    parser.add_argument("out_dir")
    parser.add_argument("--u-jackknife", help="u_jackknife JSON (v from a U batch)")
    parser.add_argument("--u-objective", help="u_objective shard (v from a U batch)")
    parser.add_argument("--step-comparison", help="step_comparison JSON (checkpoint_diff with an optimizer state)")
    parser.add_argument("--exact", help="exact_reference JSON (embedded policy only)")
    args = parser.parse_args()
    with stage_run():
        out = Path(args.out_dir)
        main(_defining_only(config_for(args.config, "summary")), args.delta_h1, args.delta_h_snis, args.u_jackknife,
             args.u_objective, out / "summary.json", out / "summary.txt", out / "plot.png", args.exact,
             args.step_comparison)
