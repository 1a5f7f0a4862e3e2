"""Stage: an update variant's passes over one E shard (update.variants): the directional sums along
its v (the E-side SE of its δH₁) and the SNIS pass at θ + η·v for every η (its ΔH(η)). The main
stages' own scripts (directional.py, snis_shard.py), run one after the other in one process: one
start-up per shard instead of two, the same files as the main stages write.

By hand:  python scripts/variant_e_pass.py CONFIG.yaml ROLLOUT.safetensors POLICY_DIR V.safetensors DIRECTIONAL_OUT SNIS_OUT
"""
import argparse
import importlib.util
from pathlib import Path

from entropy_probe.stage import rule_config, stage_run

HERE = Path(__file__).resolve().parent


def _stage(name: str):
    """A sibling stage script as a module (its snakemake branch does not run: no `snakemake` global)."""
    spec = importlib.util.spec_from_file_location(f"entropy_probe_stage_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(cfg: dict, rollout_path: str, policy_dir: str, v_path: str, directional_out: str, snis_out: str) -> None:
    _stage("directional").main(cfg, rollout_path, policy_dir, v_path, directional_out)
    _stage("snis_shard").main(cfg, rollout_path, policy_dir, v_path, snis_out)


if "snakemake" in globals():
    with stage_run(snakemake.log[0], snakemake.threads):  # noqa: F821
        main(rule_config(snakemake), snakemake.input.rollout, snakemake.input.policy, snakemake.input.v,  # noqa: F821
             snakemake.output.directional, snakemake.output.snis)  # noqa: F821
elif __name__ == "__main__":
    from entropy_probe.config import load_config
    from entropy_probe.stage_keys import stage_config_from
    from entropy_probe.variants import variant_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("config", "rollout", "policy_dir", "v", "directional_out", "snis_out"):
        parser.add_argument(name)
    parser.add_argument("--variant", help="a variant of update.variants (its effective config); default: the main update")
    args = parser.parse_args()
    with stage_run():
        config = load_config(args.config)
        if args.variant:
            config = variant_config(config, args.variant)
        main(stage_config_from(config, "variant_e_pass"), args.rollout, args.policy_dir, args.v, args.directional_out,
             args.snis_out)
