"""Stage: the batch plan (E and U prompt ids, split into shards), written as JSON. Prompt ids are
line numbers of the prepared prompt files (prepare_data); the plan records which file and its hash.

By hand:  python scripts/plan.py CONFIG.yaml DATA_SUMMARY.json OUT.json
"""
import argparse
import logging
import math

from entropy_probe.config import ConfigError, load_config
from entropy_probe.plan import make_plan
from entropy_probe.shards import read_json, write_json
from entropy_probe.stage import stage_run


def check_sizes(batch: dict, data_summary: dict) -> None:
    """B_U and the distinct E draw against the prepared (filtered) prompt sets."""
    def where(kind):
        info = data_summary[kind]
        dropped = info.get("num_dropped_too_long", 0)
        return (f"the {kind} prompt set (split {info['split']!r}) has {info['size']} prompts"
                + (f" after data.max_prompt_tokens dropped {dropped}" if dropped else ""))

    if batch["B_U"] > data_summary["U"]["size"]:
        raise ConfigError(f"batch_config.B_U: {batch['B_U']} distinct prompts, but {where('U')}")
    n_e = math.ceil(batch["E_total_sequences"] / batch["G"])
    if batch["E_sampling_mode"] == "distinct" and n_e > data_summary["E"]["size"]:
        raise ConfigError(f"batch_config.E_total_sequences: distinct mode needs {n_e} prompts, but {where('E')}")


def main(cfg: dict, data_summary_path: str, out_path: str) -> None:
    batch = cfg["batch_config"]
    data_summary = read_json(data_summary_path)
    check_sizes(batch, data_summary)
    plan = make_plan(
        dataset_size=data_summary["E"]["size"], U_dataset_size=data_summary["U"]["size"], seed=batch["seed"],
        G=batch["G"], E_total_sequences=batch["E_total_sequences"], E_sampling_mode=batch["E_sampling_mode"],
        B_U=batch["B_U"], E_num_shards=batch["E_num_shards"], U_num_shards=batch["U_num_shards"],
    )
    for kind in ("E", "U"):
        plan[kind]["data"] = {key: data_summary[kind][key] for key in ("split", "file", "sha256")}
    write_json(out_path, plan)
    e, u = plan["E"], plan["U"]
    logging.getLogger("plan").info(
        "E: %d prompts (%s, %d distinct) of %d in %d shards; U: %d distinct prompts of %d in %d shards",
        len(e["prompt_ids"]), e["sampling_mode"], len(set(e["prompt_ids"])), e["dataset_size"], len(e["shards"]),
        len(u["prompt_ids"]), u["dataset_size"], len(u["shards"]),
    )


if "snakemake" in globals():
    with stage_run(snakemake.log[0]):  # noqa: F821
        main(snakemake.params.cfg, snakemake.input.data, snakemake.output[0])  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("data_summary", help="results/data/summary.json (prepare_data)")
    parser.add_argument("out_path")
    args = parser.parse_args()
    with stage_run():
        main(load_config(args.config), args.data_summary, args.out_path)
