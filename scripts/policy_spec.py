"""Stage (configured models only): resolve model.name_or_path (a local checkpoint directory, or a
hub id fetched into the Hugging Face cache) and the optional PEFT adapter, fingerprint their files
and write the policy spec (results/policy.json) that every later stage loads the policy from.

By hand:  python scripts/policy_spec.py CONFIG.yaml OUT.json
"""
import logging

from entropy_probe.models import write_spec
from entropy_probe.stage import run_stage


def main(cfg: dict, out_path: str) -> None:
    spec = write_spec(cfg["model"], out_path)
    logging.getLogger("policy_spec").info(
        "model %s (%s)%s, fingerprint %s", spec["name_or_path"], spec["model_dir"],
        f", adapter {spec['adapter_path']} ({spec['adapter_dir']})" if spec["adapter_dir"] else "",
        spec["fingerprint"])


run_stage(globals(), main, ["out_path"], lambda smk: {"out_path": smk.output[0]}, stage="policy_spec")
