"""Stage: the true ΔH(η) with θ's nucleus held fixed, by SNIS over the whole E batch (DESIGN §2),
with SE, ESS and diagnostics per η; rows whose ESS/N is below snis.MIN_ESS_FRACTION are flagged
(``ess_low``: their SE is not to be trusted). The entropy is estimator.entropy's.

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
    G, norm, entropy = cfg["batch_config"]["G"], cfg["estimator"]["normalization"], cfg["estimator"]["entropy"]
    S_field, S_shifted_field = snis.ENTROPY_FIELDS[entropy]
    missing = [p for p, (t, _) in zip(shard_paths, loaded) if S_field not in t]
    if missing:
        raise shards.ShardError(f"{missing[0]}: no {S_field!r} (written before both entropies were stored): "
                                "rerun it (snakemake --forcerun snis_shard)")
    cat = {k: torch.cat([t[k] for t, _ in loaded], dim=-1)
           for k in ("log_w", S_shifted_field, "own_nucleus_differs", S_field, "T")}
    rows = []
    for j, eta in enumerate(etas):
        row = snis.delta_h(cat["log_w"][j], cat[S_shifted_field][j], cat[S_field], cat["T"],
                           cat["own_nucleus_differs"][j], G, norm)
        rows.append({"eta": eta, **row})
        logging.getLogger("delta_h_snis").info("eta %.4g: ΔH = %.6g ± %.3g, ESS %.1f / %d%s", eta, row["delta_h"],
                                               row["se"], row["ess"], row["num_sequences"],
                                               " (low: SE not to be trusted)" if row["ess_low"] else "")
    shards.write_json(out_path, {"normalization": norm, "entropy": entropy,
                                 "model_fingerprint": loaded[0][1]["model_fingerprint"],
                                 "min_ess_fraction": snis.MIN_ESS_FRACTION, "rows": rows})


run_stage(globals(), main, ["out_path", ("shard_paths", "SNIS shards", {"nargs": "+"})],
          lambda smk: {"shard_paths": list(smk.input), "out_path": smk.output[0]}, stage="delta_h_snis")
