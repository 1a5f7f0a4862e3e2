"""Stage: δH₁(η) = η·X·v for every η of estimator.eta_list (and the η of the trainer's step when
v records one), with its E-side standard error and per-module split: delta_h1.json and a
one-screen table (delta_h1.txt). The JSON carries v's account of the update (optimizer, the
trainer checkpoint and its learning rate) for the report.

By hand:  python scripts/delta_h1.py CONFIG.yaml X.safetensors V.safetensors OUT.json OUT.txt DIRECTIONAL...
"""
import argparse

from entropy_probe import first_order, gradients, shards
from entropy_probe.config import with_training_eta
from entropy_probe.report import update_account
from entropy_probe.stage import config_for, rule_config, stage_run


def main(cfg: dict, x_path: str, v_path: str, directional_paths: list[str], json_path: str, table_path: str) -> None:
    x_tensors, x_meta = shards.read_shard(x_path, {"kind": "X"})
    X, _ = gradients.unpack(x_tensors)
    v, v_meta = shards.read_shard(v_path, {"kind": "v", "model_fingerprint": x_meta["model_fingerprint"]})
    expect = {"kind": "directional", "model_fingerprint": x_meta["model_fingerprint"],
              "normalization": x_meta["normalization"]}
    directional = [shards.read_shard(p, expect)[0] for p in directional_paths]
    report = first_order.first_order_report(
        X, v, directional, cfg["batch_config"]["G"], x_meta["normalization"],
        with_training_eta(cfg["estimator"]["eta_list"], v_meta.get("training_eta"))
    )
    report["model_fingerprint"] = x_meta["model_fingerprint"]
    report["update"] = update_account(v_meta)
    table = first_order.format_table(report)
    shards.write_json(json_path, report)
    with shards.atomic_path(table_path) as tmp:
        tmp.write_text(table)
    print(table)


if "snakemake" in globals():
    with stage_run(snakemake.log[0], snakemake.threads):  # noqa: F821
        main(rule_config(snakemake), snakemake.input.X, snakemake.input.v, list(snakemake.input.directional),  # noqa: F821
             snakemake.output.json, snakemake.output.table)  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("x")
    parser.add_argument("v")
    parser.add_argument("json_out")
    parser.add_argument("table_out")
    parser.add_argument("directional", nargs="+")
    args = parser.parse_args()
    with stage_run():
        main(config_for(args.config, "delta_h1"), args.x, args.v, args.directional, args.json_out, args.table_out)
