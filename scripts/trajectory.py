"""Stage (model.checkpoints): the report over training from every pair's summary.json:
trajectory.json (the rows and every pair's summary), trajectory.txt (the table, also printed) and
trajectory.png.

By hand:  python scripts/trajectory.py OUT_DIR PAIR_SUMMARY.json...   (in training order)
"""
import argparse
from pathlib import Path

from entropy_probe import report, shards, trajectory_report
from entropy_probe.stage import stage_run


def main(summary_paths: list[str], json_path: str, table_path: str, plot_path: str) -> None:
    summaries = [(Path(p).parent.name, shards.read_json(p)) for p in summary_paths]
    units = {s["unit"] for _, s in summaries}
    if len(units) != 1:
        raise shards.ShardError(f"the pairs' summaries have different units {sorted(units)}: {summary_paths}")
    unit = units.pop()
    rows = trajectory_report.trajectory_rows(summaries)
    table = trajectory_report.format_table(rows, unit)
    with shards.atomic_path(plot_path, suffix=".png") as tmp:
        trajectory_report.plot(rows, tmp, unit)
    shards.write_json(json_path, {"rows": rows, "unit": unit, "pairs": dict(summaries), **report.provenance()})
    with shards.atomic_path(table_path) as tmp:
        tmp.write_text(table)
    print(table)


if "snakemake" in globals():
    with stage_run(snakemake.log[0], snakemake.threads):  # noqa: F821
        out = snakemake.output  # noqa: F821
        main(list(snakemake.input), out.json, out.table, out.plot)  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("summaries", nargs="+")
    args = parser.parse_args()
    with stage_run():
        out = Path(args.out_dir)
        main(args.summaries, out / "trajectory.json", out / "trajectory.txt", out / "trajectory.png")
