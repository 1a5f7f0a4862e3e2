"""Stage: the update vector v = Δθ/η of one optimizer step from the reduced Y gradient
(DESIGN §2 "Y and v"). sgd: v = Y; adamw: one torch AdamW step from the checkpoint's optimizer
state (update.optimizer_state) or, with none, from a fresh optimizer. Optional clipping of the
gradient by global norm (update.max_grad_norm). v is keyed like Y, in float64.

By hand:  python scripts/update_vector.py CONFIG.yaml Y.safetensors POLICY_DIR OUT.safetensors
"""
import argparse
import logging

from entropy_probe import gradients, models, shards
from entropy_probe.config import EMBEDDED, load_config
from entropy_probe.optimizer_state import load_adamw_state, resolve_state_paths
from entropy_probe.stage import setup_logging
from entropy_probe.update import FRESH_HYPER, clip_coefficient, update_direction

log = logging.getLogger("update_vector")


def main(cfg: dict, y_path: str, policy_dir: str, out_path: str) -> None:
    upd = cfg["update"]
    optimizer, max_grad_norm = upd["optimizer"], float(upd["max_grad_norm"])
    paths = resolve_state_paths(upd, policy_dir, cfg["model"]["name_or_path"] == EMBEDDED)
    tensors, y_meta = shards.read_shard(y_path, {"kind": "Y"})
    Y, _ = gradients.unpack(tensors)
    coef = clip_coefficient(Y, max_grad_norm)
    meta = {"kind": "v", "optimizer": optimizer, "model_fingerprint": y_meta["model_fingerprint"],
            "param_filter": y_meta.get("param_filter"), "loss_normalization": y_meta.get("loss_normalization"),
            "max_grad_norm": max_grad_norm, "grad_norm": gradients.global_norm(Y), "clip_coef": coef}
    if optimizer == "sgd":
        v = update_direction("sgd", Y, max_grad_norm=max_grad_norm)
    else:
        fingerprint = models.fingerprint(policy_dir)
        if fingerprint != y_meta["model_fingerprint"]:
            raise shards.ShardError(f"{y_path}: Y was computed for model {y_meta['model_fingerprint']}, "
                                    f"the policy {policy_dir} is {fingerprint}")
        model = models.load_policy(policy_dir, cfg["model"]["dtype"], "cpu")
        theta = {name: p.detach() for name, p in model.named_parameters()}
        unknown = sorted(set(Y) - set(theta))
        if unknown:
            raise shards.ShardError(f"{y_path}: Y has parameters the policy {policy_dir} lacks: {unknown[:3]}")
        state = None
        if paths is None:
            log.info("adamw without optimizer state: the first step of a fresh torch AdamW (betas %s, eps %g, "
                     "weight_decay %g)", FRESH_HYPER.betas, FRESH_HYPER.eps, FRESH_HYPER.weight_decay)
            meta |= {"optimizer_state": "", "optimizer_step": 0, "optimizer_param_groups": [
                {"betas": list(FRESH_HYPER.betas), "eps": FRESH_HYPER.eps, "weight_decay": FRESH_HYPER.weight_decay}]}
        else:
            loaded = load_adamw_state(*paths, theta)
            state = loaded.per_param
            meta |= loaded.summary()
            log.info("adamw state %s: step %s, param groups %s", loaded.path,
                     loaded.steps[-1] if len(loaded.steps) == 1 else loaded.steps, loaded.groups)
        v = update_direction("adamw", Y, {name: theta[name] for name in Y}, state, max_grad_norm)
    shards.write_shard(out_path, v, meta)
    log.info("v (%s): |v| = %.6g over %d tensors; |Y| = %.6g, clip coefficient %.6g", optimizer,
             gradients.global_norm(v), len(v), meta["grad_norm"], coef)


if "snakemake" in globals():
    setup_logging(snakemake.log[0])  # noqa: F821
    main(snakemake.params.cfg, snakemake.input.Y, snakemake.input.policy, snakemake.output[0])  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("y")
    parser.add_argument("policy_dir")
    parser.add_argument("out")
    args = parser.parse_args()
    setup_logging()
    main(load_config(args.config), args.y, args.policy_dir, args.out)
