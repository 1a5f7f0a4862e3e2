"""The policy every later stage loads: the embedded tiny policy (built and trained here), or the
spec of a configured model (its resolved checkpoint and adapter, fingerprinted)."""
from __future__ import annotations

from typing import Annotated

import logging
import shutil
from pathlib import Path

from .. import models, shards
from ..stage import Out
from ..toy import build_embedded_policy

log = logging.getLogger(__name__)


def build_policy(cfg: dict, *, policy: Annotated[str, Out("the embedded policy's directory (results/policy)")]) -> None:
    """Build and train the embedded tiny policy (config section ``toy``): an HF checkpoint, its
    tokenizer, the prompt set and the AdamW state of its last steps."""
    out = Path(policy)
    staging = out.with_name(f".{out.name}.tmp")  # built aside, renamed when complete
    shutil.rmtree(staging, ignore_errors=True)
    report = build_embedded_policy(staging, **cfg["toy"])
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    log.info("embedded policy written to %s: %s", out, report)


def policy_spec(cfg: dict, *, spec: Annotated[str, Out("the policy spec (results/policy.json)")]) -> None:
    """Resolve model.name_or_path (a local checkpoint directory, or a hub id fetched into the
    Hugging Face cache) and the optional PEFT adapter, or the trainer checkpoint model.checkpoint,
    fingerprint their files and write the policy spec every later stage loads the policy from."""
    resolved = models.resolve_spec(cfg["model"])
    shards.write_json(spec, resolved)
    log.info("model %s (%s)%s, fingerprint %s", resolved["name_or_path"], resolved["model_dir"],
             f", adapter {resolved['adapter_path']} ({resolved['adapter_dir']})" if resolved["adapter_dir"] else "",
             resolved["fingerprint"])
