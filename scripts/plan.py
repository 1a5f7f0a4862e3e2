"""Stage: the batch plan (E and U prompt ids, split into shards), written as JSON.

By hand:  python scripts/plan.py CONFIG.yaml OUT.json
"""
import argparse
import logging

from entropy_probe.config import dataset_size, load_config
from entropy_probe.plan import make_plan
from entropy_probe.shards import write_json
from entropy_probe.stage import setup_logging


def main(cfg: dict, size: int, out_path: str) -> None:
    batch = cfg["batch_config"]
    plan = make_plan(
        dataset_size=size, seed=batch["seed"], G=batch["G"], E_total_sequences=batch["E_total_sequences"],
        E_sampling_mode=batch["E_sampling_mode"], B_U=batch["B_U"], E_num_shards=batch["E_num_shards"],
        U_num_shards=batch["U_num_shards"],
    )
    write_json(out_path, plan)
    e, u = plan["E"], plan["U"]
    logging.getLogger("plan").info(
        "E: %d prompts (%s, %d distinct) in %d shards; U: %d distinct prompts in %d shards",
        len(e["prompt_ids"]), e["sampling_mode"], len(set(e["prompt_ids"])), len(e["shards"]),
        len(u["prompt_ids"]), len(u["shards"]),
    )


if "snakemake" in globals():
    setup_logging(snakemake.log[0])  # noqa: F821
    main(snakemake.params.cfg, snakemake.params.dataset_size, snakemake.output[0])  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("out_path")
    args = parser.parse_args()
    setup_logging()
    config = load_config(args.config)
    main(config, dataset_size(config), args.out_path)
