"""Stage: the true ΔH(η) with θ's nucleus held fixed, by SNIS over the whole E batch (DESIGN §2),
with SE, ESS and diagnostics per η.

By hand:  python scripts/delta_h_snis.py CONFIG.yaml OUT.json SNIS_SHARD...
"""
import logging

import torch

from entropy_probe import shards, snis
from entropy_probe.stage import run_stage


def main(cfg: dict, shard_paths: list[str], out_path: str) -> None:
    loaded = [shards.read_shard(p, {"kind": "snis"}) for p in shard_paths]
    if len({repr(m["etas"]) for _, m in loaded}) != 1 or len({m["model_fingerprint"] for _, m in loaded}) != 1:
        raise shards.ShardError(f"SNIS shards disagree on the η sweep or the model: {shard_paths}")
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
                                 "rows": rows})


run_stage(globals(), main, ["out_path", ("shard_paths", "SNIS shards", {"nargs": "+"})],
          lambda smk: {"shard_paths": list(smk.input), "out_path": smk.output[0]}, stage="delta_h_snis")
