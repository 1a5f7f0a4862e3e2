"""Stage: the true ΔH(η) with θ's nucleus held fixed, by SNIS over the whole E batch (DESIGN §2),
with SE, ESS and diagnostics per η; rows whose ESS/N is below snis.MIN_ESS_FRACTION are flagged
(``ess_low``: their SE is not to be trusted). The entropy is estimator.entropy's.

By hand:  python scripts/delta_h_snis.py CONFIG.yaml OUT.json SNIS_SHARD...
"""
import logging

from entropy_probe import shards, snis
from entropy_probe.stage import run_stage


def main(cfg: dict, shard_paths: list[str], out_path: str) -> None:
    loaded = [shards.read_shard(p, {"kind": "snis"}) for p in shard_paths]
    try:
        result = snis.delta_h_sweep(loaded, cfg["batch_config"]["G"], cfg["estimator"]["normalization"],
                                    cfg["estimator"]["entropy"])
    except ValueError as err:
        raise shards.ShardError(f"{err}: {shard_paths}") from err
    for row in result["rows"]:
        logging.getLogger("delta_h_snis").info("eta %.4g: ΔH = %.6g ± %.3g, ESS %.1f / %d%s", row["eta"], row["delta_h"],
                                               row["se"], row["ess"], row["num_sequences"],
                                               " (low: SE not to be trusted)" if row["ess_low"] else "")
    shards.write_json(out_path, result)


run_stage(globals(), main, ["out_path", ("shard_paths", "SNIS shards", {"nargs": "+"})],
          lambda smk: {"shard_paths": list(smk.input), "out_path": smk.output[0]}, stage="delta_h_snis")
