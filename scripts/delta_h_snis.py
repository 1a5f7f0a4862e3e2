"""Stage: the true ΔH(η) with θ's nucleus held fixed, by SNIS over the whole E batch (DESIGN §2),
with SE, ESS and diagnostics per η.

By hand:  python scripts/delta_h_snis.py CONFIG.yaml OUT.json SNIS_SHARD...
"""
import argparse
import logging

from entropy_probe import shards, snis
from entropy_probe.stage import config_for, rule_config, stage_run


def main(cfg: dict, shard_paths: list[str], out_path: str) -> None:
    loaded = [shards.read_shard(p, {"kind": "snis"}) for p in shard_paths]
    try:
        result = snis.delta_h_sweep(loaded, cfg["batch_config"]["G"], cfg["estimator"]["normalization"])
    except ValueError as err:
        raise shards.ShardError(f"{err}: {shard_paths}") from err
    for row in result["rows"]:
        logging.getLogger("delta_h_snis").info("eta %.4g: ΔH = %.6g ± %.3g, ESS %.1f / %d", row["eta"], row["delta_h"],
                                               row["se"], row["ess"], row["num_sequences"])
    shards.write_json(out_path, result)


if "snakemake" in globals():
    with stage_run(snakemake.log[0], snakemake.threads):  # noqa: F821
        main(rule_config(snakemake), list(snakemake.input), snakemake.output[0])  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("shards", nargs="+")
    args = parser.parse_args()
    with stage_run():
        main(config_for(args.config, "delta_h_snis"), args.shards, args.out)
