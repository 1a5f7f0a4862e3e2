"""Stage: the final report: summary.json (every number, the config, version, git commit, model
fingerprint), summary.txt (the table, also printed) and plot.png.

By hand:  python scripts/summary.py CONFIG.yaml DELTA_H1.json DELTA_H.json U_JACKKNIFE.json OUT_DIR
"""
import argparse
from pathlib import Path

from entropy_probe import report, shards
from entropy_probe.config import load_config
from entropy_probe.stage import stage_run


def main(config: dict, delta_h1_path: str, delta_h_path: str, jackknife_path: str, json_path: str, table_path: str,
         plot_path: str, exact_path: str | None = None) -> None:
    first_order, measured = shards.read_json(delta_h1_path), shards.read_json(delta_h_path)
    jackknife = shards.read_json(jackknife_path)
    exact = shards.read_json(exact_path) if exact_path else None
    if first_order["model_fingerprint"] != measured["model_fingerprint"]:
        raise shards.ShardError(f"{delta_h1_path} and {delta_h_path} come from different models")
    exact_by_eta = {r["eta"]: r["exact_delta_h"] for r in exact["delta_h"]} if exact else None
    rows = report.combine(first_order, measured, jackknife, exact_by_eta)
    unit = "nats/token" if first_order["normalization"] == "token" else "nats/response"
    table = report.format_table(rows, unit)
    with shards.atomic_path(plot_path, suffix=".png") as tmp:
        report.plot(rows, tmp, unit)
    shards.write_json(json_path, {
        "rows": rows, "first_order": first_order, "delta_h": measured, "u_jackknife": jackknife, "exact": exact, "unit": unit,
        "model_fingerprint": first_order["model_fingerprint"], "config": config, **report.provenance(),
    })
    with shards.atomic_path(table_path) as tmp:
        tmp.write_text(table)
    print(table)


if "snakemake" in globals():
    with stage_run(snakemake.log[0]):  # noqa: F821
        main(snakemake.config, snakemake.input.delta_h1, snakemake.input.delta_h, snakemake.input.u_jackknife,  # noqa: F821
             snakemake.output.json, snakemake.output.table, snakemake.output.plot,  # noqa: F821
             snakemake.input.get("exact"))  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("delta_h1")
    parser.add_argument("delta_h")
    parser.add_argument("u_jackknife")
    parser.add_argument("out_dir")
    parser.add_argument("--exact", help="exact_reference JSON (embedded policy only)")
    args = parser.parse_args()
    with stage_run():
        out = Path(args.out_dir)
        main(load_config(args.config), args.delta_h1, args.delta_h, args.u_jackknife, out / "summary.json",
             out / "summary.txt", out / "plot.png", args.exact)
