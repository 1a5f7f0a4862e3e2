"""Stage: build and train the embedded tiny policy (config section `toy`).

By hand:  python scripts/build_policy.py CONFIG.yaml OUT_DIR
"""
import logging
import shutil
from pathlib import Path

from entropy_probe.stage import run_stage
from entropy_probe.toy import build_embedded_policy


def main(cfg: dict, out_dir: str) -> None:
    out = Path(out_dir)
    staging = out.with_name(f".{out.name}.tmp")  # built aside, renamed when complete
    shutil.rmtree(staging, ignore_errors=True)
    report = build_embedded_policy(staging, **cfg["toy"])
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    logging.getLogger("build_policy").info("embedded policy written to %s: %s", out, report)


run_stage(globals(), main, ["out_dir"], lambda smk: {"out_dir": smk.output[0]}, stage="build_policy")
