"""Stage: an update variant's passes over one E shard (update.variants): the directional sums along
its v (the E-side SE of its δH₁) and the SNIS pass at θ + η·v for every η (its ΔH(η)). The main
stages' own scripts (directional.py, snis_shard.py), run one after the other in one process: one
start-up per shard instead of two, the same files as the main stages write. (The passes read no
update key, so by hand the main config serves every variant.)

By hand:  python scripts/variant_e_pass.py CONFIG.yaml ROLLOUT.safetensors POLICY_DIR V.safetensors DIRECTIONAL_OUT SNIS_OUT
"""
import importlib.util
from pathlib import Path

from entropy_probe.stage import run_stage

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


run_stage(globals(), main, ["rollout_path", "policy_dir", "v_path", "directional_out", "snis_out"],
          lambda smk: {"rollout_path": smk.input.rollout, "policy_dir": smk.input.policy, "v_path": smk.input.v,
                       "directional_out": smk.output.directional, "snis_out": smk.output.snis},
          stage="variant_e_pass")
