"""Stage: whole-E-batch plug-ins (H̄, T̄) from the E rollout shards' sampling-time per-prefix
entropies (estimator.entropy: the RB entropy of q, or the full tempered one).

By hand:  python scripts/e_stats.py CONFIG.yaml POLICY_DIR OUT.json E_SHARD...
"""
import logging

from entropy_probe import models, stage_inputs
from entropy_probe.shards import write_json
from entropy_probe.stage import run_stage


def main(cfg: dict, policy_dir: str, rollout_paths: list[str], out_path: str) -> None:
    rollouts = stage_inputs.read_rollouts(rollout_paths, cfg, "E", models.fingerprint(policy_dir))
    stats = stage_inputs.e_batch_stats(rollouts, cfg["estimator"]["entropy"])
    write_json(out_path, stats)
    logging.getLogger("e_stats").info("E batch: %s", stats)


run_stage(globals(), main, ["policy_dir", "out_path", ("rollout_paths", "E rollout shards", {"nargs": "+"})],
          lambda smk: {"policy_dir": smk.input.policy, "rollout_paths": list(smk.input.rollouts),
                       "out_path": smk.output[0]}, stage="e_stats")
