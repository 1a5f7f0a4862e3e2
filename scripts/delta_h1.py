"""Stage: δH₁(η) = η·X·v for every η of estimator.eta_list (and the η of the trainer's step when
v records one), with its E-side standard error and per-module split: delta_h1.json and a
one-screen table (delta_h1.txt). The JSON carries v's account of the update (optimizer, the
trainer checkpoint and its learning rate) for the report.

By hand:  python scripts/delta_h1.py CONFIG.yaml X.safetensors V.safetensors OUT.json OUT.txt DIRECTIONAL...
"""

from entropy_probe import first_order, gradients, shards
from entropy_probe.config import with_training_eta
from entropy_probe.report import update_account
from entropy_probe.stage import run_stage


def main(cfg: dict, x: str, v: str, json_out: str, table_out: str, directional: list[str]) -> None:
    x_tensors, x_meta = shards.read_shard(x, {"kind": "X"})
    X, _ = gradients.unpack(x_tensors)
    v_tensors, v_meta = shards.read_shard(v, {"kind": "v", "model_fingerprint": x_meta["model_fingerprint"]})
    expect = {"kind": "directional", "model_fingerprint": x_meta["model_fingerprint"],
              "normalization": x_meta["normalization"], "entropy": x_meta.get("entropy", "sampler"),
              "precision": x_meta["precision"]}
    sums = [shards.read_shard(p, expect)[0] for p in directional]
    report = first_order.first_order_report(
        X, v_tensors, sums, cfg["batch_config"]["G"], x_meta["normalization"],
        with_training_eta(cfg["estimator"]["eta_list"], v_meta.get("training_eta")), precision=x_meta["precision"],
    )
    report["model_fingerprint"] = x_meta["model_fingerprint"]
    report["update"] = update_account(v_meta)
    report["tokens_outside_recomputed_nucleus"] = {  # bf16 only (entropy_probe.precision.keeps_sampled_tokens)
        "X": x_meta.get("tokens_outside_recomputed_nucleus", 0),
        "directional": int(sum(float(d["outside_nucleus"].sum()) for d in sums if "outside_nucleus" in d))}
    table = first_order.format_table(report)
    shards.write_json(json_out, report)
    with shards.atomic_path(table_out) as tmp:
        tmp.write_text(table)
    print(table)


run_stage(globals(), main, ["x", "v", "json_out", "table_out", ("directional", "directional shards", {"nargs": "+"})],
          lambda smk: {"x": smk.input.X, "v": smk.input.v, "directional": list(smk.input.directional),
                       "json_out": smk.output.json, "table_out": smk.output.table}, stage="delta_h1")
