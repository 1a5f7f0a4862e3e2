"""Stage (configured models only): resolve model.name_or_path (a local checkpoint directory, or a
hub id fetched into the Hugging Face cache) and the optional PEFT adapter, fingerprint their files
and write the policy spec (results/policy.json) that every later stage loads the policy from.

By hand:  python scripts/policy_spec.py CONFIG.yaml OUT.json
"""
import argparse
import logging

from entropy_probe.models import write_spec
from entropy_probe.stage import config_for, rule_config, stage_run


def main(model_cfg: dict, out_path: str) -> None:
    spec = write_spec(model_cfg, out_path)
    logging.getLogger("policy_spec").info(
        "model %s (%s)%s, fingerprint %s", spec["name_or_path"], spec["model_dir"],
        f", adapter {spec['adapter_path']} ({spec['adapter_dir']})" if spec["adapter_dir"] else "",
        spec["fingerprint"])


if "snakemake" in globals():
    with stage_run(snakemake.log[0], snakemake.threads):  # noqa: F821 (injected by Snakemake)
        main(rule_config(snakemake)["model"], snakemake.output[0])  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("out")
    args = parser.parse_args()
    with stage_run():
        main(config_for(args.config, "policy_spec")["model"], args.out)
