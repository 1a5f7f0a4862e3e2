"""Stage: build and train the embedded tiny policy (config section `toy`).

By hand:  python scripts/build_policy.py CONFIG.yaml OUT_DIR
"""
import argparse
import logging
import shutil
from pathlib import Path

from entropy_probe.stage import config_for, rule_config, stage_run
from entropy_probe.toy import build_embedded_policy


def main(toy: dict, out_dir: str) -> None:
    out = Path(out_dir)
    staging = out.with_name(f".{out.name}.tmp")  # built aside, renamed when complete
    shutil.rmtree(staging, ignore_errors=True)
    report = build_embedded_policy(staging, **toy)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    logging.getLogger("build_policy").info("embedded policy written to %s: %s", out, report)


if "snakemake" in globals():
    with stage_run(snakemake.log[0], snakemake.threads):  # noqa: F821 (injected by Snakemake)
        main(rule_config(snakemake)["toy"], snakemake.output[0])  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    with stage_run():
        main(config_for(args.config, "build_policy")["toy"], args.out_dir)
