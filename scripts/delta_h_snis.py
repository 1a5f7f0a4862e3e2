"""Stage: the true ΔH(η) with θ's nucleus held fixed, by SNIS over the whole E batch (DESIGN §2),
with SE, ESS and diagnostics per η.

By hand:  python scripts/delta_h_snis.py CONFIG.yaml OUT.json SNIS_SHARD...
"""
import argparse
import logging

import torch

from entropy_probe import shards, snis
from entropy_probe.stage import config_for, rule_config, stage_run


def main(cfg: dict, shard_paths: list[str], out_path: str) -> None:
    loaded = [shards.read_shard(p, {"kind": "snis"}) for p in shard_paths]
    if len({repr((m["etas"], m["model_fingerprint"], m.get("precision"))) for _, m in loaded}) != 1:
        raise shards.ShardError(f"SNIS shards disagree on the η sweep, the model or the precision: {shard_paths}")
    etas = loaded[0][1]["etas"]
    cat = {k: torch.cat([t[k] for t, _ in loaded], dim=-1) for k in ("log_w", "S_shifted", "own_nucleus_differs", "S", "T")}
    G, norm = cfg["batch_config"]["G"], cfg["estimator"]["normalization"]
    rows = []
    for j, eta in enumerate(etas):
        row = snis.delta_h(cat["log_w"][j], cat["S_shifted"][j], cat["S"], cat["T"], cat["own_nucleus_differs"][j], G, norm)
        rows.append({"eta": eta, **row})
        logging.getLogger("delta_h_snis").info("eta %.4g: ΔH = %.6g ± %.3g, ESS %.1f / %d", eta, row["delta_h"], row["se"],
                                          row["ess"], row["num_sequences"])
    shards.write_json(out_path, {"normalization": norm, "model_fingerprint": loaded[0][1]["model_fingerprint"],
                                 "precision": loaded[0][1]["precision"], "rows": rows,
                                 "tokens_outside_recomputed_nucleus": int(sum(
                                     float(t["outside_nucleus"].sum()) for t, _ in loaded if "outside_nucleus" in t))})


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
