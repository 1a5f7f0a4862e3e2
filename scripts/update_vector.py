"""Stage: the update vector v = Δθ/η of one optimizer step from the reduced Y gradient
(DESIGN §2 "Y and v"). sgd: v = Y; adamw: one torch AdamW step from the checkpoint's optimizer
state (update.optimizer_state) or, with none, from a fresh optimizer. Optional clipping of the
gradient by global norm (update.max_grad_norm). v is keyed like Y, in float64. For a variant of the
update (update.variants, its rule variant_update_vector) v is also scaled by its lr_factor.

By hand:  python scripts/update_vector.py CONFIG.yaml Y.safetensors POLICY_DIR OUT.safetensors
"""
import argparse
import logging

from entropy_probe import gradients, guards, losses, shards
from entropy_probe.stage import config_for, rule_config, stage_run
from entropy_probe.update_builder import UpdateBuilder

log = logging.getLogger("update_vector")


def main(cfg: dict, y_path: str, policy_dir: str, out_path: str, lr_factor: float = 1.0,
         variant: str | None = None) -> None:
    tensors, y_meta = shards.read_shard(y_path, {"kind": "Y"})
    Y, _ = gradients.unpack(tensors)
    if cfg["update"]["optimizer"] == "sgd" and gradients.global_norm(Y) == 0:
        if variant is None:
            raise losses.NoSignalError(f"{y_path}: Y = 0 (no prompt group of the U batch has a non-zero advantage), "
                                       "so with update.optimizer: sgd v = 0; see the u_objective log")
        # a variant's v = 0 is its answer (δH₁ = ΔH = 0); the main update decides whether the run stops
        log.warning("update variant %s: Y = 0 (no prompt group of the U batch has a non-zero advantage), so its "
                    "sgd step is v = 0", variant)
    build = UpdateBuilder(cfg, policy_dir, y_meta["model_fingerprint"], y_path)
    v = build(Y, y_path)
    if lr_factor != 1.0:
        v = {name: lr_factor * t for name, t in v.items()}
    meta = build.describe(Y) | {"kind": "v", "param_filter": y_meta.get("param_filter"),
                                "loss_type": y_meta.get("loss_type"), "lr_factor": lr_factor, "variant": variant}
    guards.check_parameters(v, "update vector v", y_path)
    shards.write_shard(out_path, v, meta)
    log.info("v (%s): |v| = %.6g over %d tensors; |Y| = %.6g, clip coefficient %.6g", build.optimizer,
             gradients.global_norm(v), len(v), meta["grad_norm"], meta["clip_coef"])


if "snakemake" in globals():
    with stage_run(snakemake.log[0], snakemake.threads):  # noqa: F821
        cfg = rule_config(snakemake)  # noqa: F821
        variant = cfg.get("variant")  # a variant's rule only (update.variants)
        main(cfg, snakemake.input.Y, snakemake.input.policy, snakemake.output[0],  # noqa: F821
             variant["lr_factor"] if variant else 1.0, variant["name"] if variant else None)
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("y")
    parser.add_argument("policy_dir")
    parser.add_argument("out")
    parser.add_argument("--lr-factor", type=float, default=1.0, help="scale v (a variant's lr_factor)")
    args = parser.parse_args()
    with stage_run():
        main(config_for(args.config, "update_vector"), args.y, args.policy_dir, args.out, args.lr_factor)
