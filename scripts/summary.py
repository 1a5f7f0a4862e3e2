"""Stage: the final report: summary.json (every number, the config values that define them,
version, git commit, model fingerprint), summary.txt (the table, also printed) and plot.png.
The columns: δH₁ (first order), ΔH with θ's nucleus (SNIS), ΔH of the sampler (fresh rollouts,
when estimator.fresh_etas is not []) and, on the embedded policy, the exact values of both ΔH.
With update.optimizer checkpoint_diff there is no U batch behind v (no jackknife, no U objective);
where the checkpoint has its optimizer state, the probe's own AdamW step is compared with the
trainer's (step_comparison.json).

By hand:  python scripts/summary.py CONFIG.yaml DELTA_H1.json DELTA_H_SNIS.json SUMMARY.json SUMMARY.txt PLOT.png
          --directional DIRECTIONAL_SHARD... --snis SNIS_SHARD... [--jackknife_path U_JACKKNIFE.json]
          [--objective_path U_OBJECTIVE.safetensors] [--comparison_path STEP_COMPARISON.json]
          [--sampler_path DELTA_H_SAMPLER.json] [--exact_path EXACT.json]
"""

from entropy_probe import linearity, normalization, report, shards
from entropy_probe import snis as snis_module
from entropy_probe.stage import run_stage
from entropy_probe.stage_keys import STAGE_KEYS, nest


def main(cfg: dict, delta_h1_path: str, snis_path: str, json_path: str, table_path: str, plot_path: str,
         directional: list[str], snis: list[str], jackknife_path: str | None = None,
         objective_path: str | None = None, exact_path: str | None = None, comparison_path: str | None = None,
         sampler_path: str | None = None) -> None:
    config = _defining_only(cfg)
    first_order, measured = shards.read_json(delta_h1_path), shards.read_json(snis_path)
    jackknife = shards.read_json(jackknife_path) if jackknife_path else None
    objective = shards.read_metadata(objective_path) if objective_path else None
    exact = shards.read_json(exact_path) if exact_path else None
    sampler = shards.read_json(sampler_path) if sampler_path else None
    comparison = shards.read_json(comparison_path) if comparison_path else None
    fingerprint = first_order["model_fingerprint"]
    for path, other in ((snis_path, measured), (sampler_path, sampler)):
        if other is not None and other["model_fingerprint"] != fingerprint:
            raise shards.ShardError(f"{delta_h1_path} and {path} come from different models")
    entropy = config["estimator"]["entropy"]
    for path, other in ((snis_path, measured), (sampler_path, sampler), (exact_path, exact)):
        if other is not None and other.get("entropy", "sampler") != entropy:
            raise shards.ShardError(f"{path}: the {other.get('entropy')!r} entropy, expected {entropy!r}")
    directional_sums = [shards.read_shard(p, {"kind": "directional", "model_fingerprint": fingerprint})[0]
                        for p in directional]
    snis_tensors = [shards.read_shard(p, {"kind": "snis", "model_fingerprint": fingerprint})[0]
                    for p in snis]
    ratios = linearity.linearity(directional_sums, snis_tensors, [r["eta"] for r in measured["rows"]],
                                 config["batch_config"]["G"], first_order["normalization"], entropy)
    exact_by_eta = {r["eta"]: r for r in exact["delta_h"]} if exact else None
    rows = report.combine(first_order, measured, jackknife, exact_by_eta, sampler, ratios)
    u_batch = None if objective is None else {
        "informative_groups": objective["informative_groups"], "num_groups": objective["num_groups"],
        "loss_type": objective["loss_type"], "loss_formula": objective["loss_formula"]}
    unit = normalization.get(first_order["normalization"]).unit
    table = report.format_table(rows, unit, u_batch, entropy, snis_module.MIN_ESS_FRACTION, first_order.get("update"),
                                comparison)
    with shards.atomic_path(plot_path, suffix=".png") as tmp:
        report.plot(rows, tmp, unit)
    shards.write_json(json_path, {
        "rows": rows, "columns": report.COLUMNS, "entropy": entropy, "first_order": first_order,
        "delta_h_snis": measured, "delta_h_sampler": sampler, "u_jackknife": jackknife, "exact": exact,
        "u_batch": u_batch, "unit": unit, "model_fingerprint": fingerprint, "update": first_order.get("update"),
        "step_comparison": comparison, "config": config,
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


run_stage(globals(), main, ["delta_h1_path", "snis_path", "json_path", "table_path", "plot_path",
                            ("--directional", "the directional shards, in E-shard order", {"nargs": "+", "required": True}),
                            ("--snis", "the SNIS shards, in E-shard order", {"nargs": "+", "required": True}),
                            ("--jackknife_path", "u_jackknife JSON (v from a U batch)"),
                            ("--objective_path", "u_objective shard (v from a U batch)"),
                            ("--exact_path", "exact_reference JSON (embedded policy only)"),
                            ("--comparison_path", "step_comparison JSON (checkpoint_diff with an optimizer state)"),
                            ("--sampler_path", "delta_h_sampler JSON (fresh rollouts)")],
          lambda smk: {"delta_h1_path": smk.input.delta_h1, "snis_path": smk.input.delta_h_snis,
                       "directional": list(smk.input.directional), "snis": list(smk.input.snis),
                       "jackknife_path": smk.input.get("u_jackknife"), "objective_path": smk.input.get("u_objective"),
                       "json_path": smk.output.json, "table_path": smk.output.table, "plot_path": smk.output.plot,
                       "exact_path": smk.input.get("exact"), "comparison_path": smk.input.get("step_comparison"),
                       "sampler_path": smk.input.get("delta_h_sampler")},
          stage="summary")
