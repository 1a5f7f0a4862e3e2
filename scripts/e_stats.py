"""Stage: whole-E-batch plug-ins (H̄, T̄) from the E rollout shards' sampling-time per-prefix
entropies (estimator.entropy: the RB entropy of q, or the full tempered one).

By hand:  python scripts/e_stats.py CONFIG.yaml POLICY_DIR OUT.json E_SHARD...
"""
import argparse
import logging

from entropy_probe import models, stage_inputs
from entropy_probe.shards import write_json
from entropy_probe.stage import config_for, rule_config, stage_run


def main(cfg: dict, policy_dir: str, rollout_paths: list[str], out_path: str) -> None:
    rollouts = stage_inputs.read_rollouts(rollout_paths, cfg, "E", models.fingerprint(policy_dir))
    stats = stage_inputs.e_batch_stats(rollouts, cfg["estimator"]["entropy"])
    write_json(out_path, stats)
    logging.getLogger("e_stats").info("E batch: %s", stats)


if "snakemake" in globals():
    with stage_run(snakemake.log[0], snakemake.threads):  # noqa: F821
        main(rule_config(snakemake), snakemake.input.policy, list(snakemake.input.rollouts), snakemake.output[0])  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("policy_dir")
    parser.add_argument("out")
    parser.add_argument("rollouts", nargs="+")
    args = parser.parse_args()
    with stage_run():
        main(config_for(args.config, "e_stats"), args.policy_dir, args.rollouts, args.out)
