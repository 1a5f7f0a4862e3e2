# Config validation first (schema: types, ranges, defaults; then cross-field checks), so a bad
# value fails before any job runs; then the paths and helpers every rule shares.
import os
import sys
from pathlib import Path

from snakemake.utils import validate

# The entropy_probe package of this checkout, for the Snakefile and for every job's script (also
# when it is not pip-installed, or another checkout is): jobs inherit the environment.
# (set, not required from the user: no envvars directive)
sys.path.insert(0, workflow.basedir)
os.environ.update(
    PYTHONPATH=os.pathsep.join(p for p in (workflow.basedir, os.getenv("PYTHONPATH")) if p)
)

from entropy_probe.config import ConfigError, check_config, check_renamed
from entropy_probe import data as probe_data
from entropy_probe.input_files import (
    EMBEDDED,
    adapter_files,
    checkpoint_files,
    resolve_state_paths,
)
from entropy_probe.stage_keys import rule_params

try:
    check_renamed(config)
except ConfigError as err:
    raise WorkflowError(f"Invalid config: {err}")
try:
    validate(config, "../schemas/config.schema.yaml")
except (
    WorkflowError
) as err:  # one line naming the key (Snakemake's own message spreads it over ten)
    bad = err.__context__
    if not hasattr(bad, "absolute_path"):
        raise
    raise WorkflowError(
        f"Invalid config: {'.'.join(map(str, bad.absolute_path)) or '(top level)'}: {bad.message}"
    )
try:
    check_config(config)
except ConfigError as err:
    raise WorkflowError(f"Invalid config: {err}")

RESULTS = "results"
EMBEDDED_MODEL = config["model"]["name_or_path"] == EMBEDDED
# What every rule's `policy` input is: the embedded policy's directory, or the policy spec
# (policy_spec rule: the resolved checkpoint, adapter and fingerprint) of a configured model.
POLICY = f"{RESULTS}/policy" if EMBEDDED_MODEL else f"{RESULTS}/policy.json"
# The prepared prompt set of each batch's split (prepare_data rule, one job per split).
SPLIT_OF_KIND = probe_data.kind_splits(config["data"])
SPLIT_OF_NAME = {probe_data.prepared_name(s): s for s in SPLIT_OF_KIND.values()}
PREPARED = {
    kind: f"{RESULTS}/data/{probe_data.prepared_name(split)}.json"
    for kind, split in SPLIT_OF_KIND.items()
}
# The embedded policy is small enough to enumerate every response: its exact ΔH(η) is drawn too.
EXACT_REFERENCE = (
    EMBEDDED_MODEL
    and config["generation"]["max_new_tokens"] <= 4
    and not config["generation"]["stop_strings"]
)
# Model stages: one GPU each with model.device: cuda (on a cluster the profile's set-resources
# asks for it); `--set-threads RULE=N` (or a profile) changes a rule's threads.
GPU = 1 if config["model"]["device"] == "cuda" else 0
MODEL_THREADS = 2


def params_of(stage):
    """A rule's params: the values that define its output, canonical (entropy_probe.stage_keys).
    A function, so that Snakemake does not format the JSON text with the job's wildcards (a
    data.source with {split} in it would be rewritten)."""
    values = rule_params(config, stage)
    return lambda wildcards: values


def local_model_files():
    """The local checkpoint and adapter files the policy spec depends on (hub ids: none)."""
    files = []
    for key, lister in (
        ("name_or_path", checkpoint_files),
        ("adapter_path", adapter_files),
    ):
        path = Path(config["model"].get(key) or "").expanduser()
        if config["model"].get(key) and path.is_dir():
            files += [str(p) for p in lister(path)]
    return files


def shard_paths(template, kind):
    """Every shard of batch ``kind`` (E or U) for a path template with a {shard} field."""
    return expand(
        template,
        shard=[f"{i:03d}" for i in range(config["batch_config"][f"{kind}_num_shards"])],
    )


def benchmark_path(name):
    """Per-job benchmark file (wall time, peak memory) of a model stage, for sizing resources."""
    return f"{RESULTS}/benchmarks/{name}.tsv"


# The optimizer state of update.optimizer: adamw is an input of the update steps (for
# optimizer_state: embedded it lies inside the policy directory, an input anyway). check_config
# has already refused a combination of the update keys that makes no sense.
UPDATE_STATE_PATHS = resolve_state_paths(config["update"], POLICY, EMBEDDED_MODEL)


def update_state_inputs(wildcards):
    if UPDATE_STATE_PATHS is None or config["update"]["optimizer_state"] == "embedded":
        return {}
    state, names = UPDATE_STATE_PATHS
    return {"optimizer_state": state, "optimizer_param_names": names}
