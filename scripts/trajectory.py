"""Stage (model.checkpoints): the report over training from every pair's summary.json:
trajectory.json (the rows and every pair's summary), trajectory.txt (the table, also printed) and
trajectory.png.

By hand:  python scripts/trajectory.py OUT.json OUT.txt OUT.png PAIR_SUMMARY.json...   (in training order)
"""
from pathlib import Path

from entropy_probe import report, shards, trajectory_report
from entropy_probe.stage import run_stage


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


run_stage(globals(), main, ["json_path", "table_path", "plot_path",
                            ("summary_paths", "the pairs' summary.json, in training order", {"nargs": "+"})],
          lambda smk: {"summary_paths": list(smk.input), "json_path": smk.output.json, "table_path": smk.output.table,
                       "plot_path": smk.output.plot})
