# Config validation first (schema: types, ranges, defaults; then cross-field checks), so a bad
# value fails before any job runs; then the paths every rule shares.
import sys
from pathlib import Path

from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)  # the entropy_probe package, also when not pip-installed

from entropy_probe.config import ConfigError, EMBEDDED, check_config
from entropy_probe import data as probe_data
from entropy_probe.input_files import adapter_files, checkpoint_files, resolve_state_paths


try:
    validate(config, "../schemas/config.schema.yaml")
except WorkflowError as err:  # one line naming the key (Snakemake's own message spreads it over ten)
    bad = err.__context__
    if not hasattr(bad, "absolute_path"):
        raise
    raise WorkflowError(f"Invalid config: {'.'.join(map(str, bad.absolute_path)) or '(top level)'}: {bad.message}")
try:
    check_config(config)
except ConfigError as err:
    raise WorkflowError(f"Invalid config: {err}")

RESULTS = "results"
EMBEDDED_MODEL = config["model"]["name_or_path"] == EMBEDDED
# What every rule's `policy` input is: the embedded policy's directory, or the policy spec
# (policy_spec rule: the resolved checkpoint, adapter and fingerprint) of a configured model.
POLICY_DIR = f"{RESULTS}/policy" if EMBEDDED_MODEL else f"{RESULTS}/policy.json"
# The prepared prompt sets (prepare_data rule), one jsonl per split, and their summary.
DATA_SPLITS = sorted(set(probe_data.kind_splits(config["data"]).values()))
DATA_FILES = {s: f"{RESULTS}/data/{probe_data.prepared_name(s)}.jsonl" for s in DATA_SPLITS}
DATA_SUMMARY = f"{RESULTS}/data/summary.json"
# The embedded policy is small enough to enumerate every response: its exact ΔH(η) is drawn too.
EXACT_REFERENCE = (EMBEDDED_MODEL and config["generation"]["max_new_tokens"] <= 4
                   and not config["generation"].get("stop_strings"))


def local_model_files():
    """The local checkpoint and adapter files the policy spec depends on (hub ids: none)."""
    files = []
    for key, lister in (("name_or_path", checkpoint_files), ("adapter_path", adapter_files)):
        path = Path(config["model"].get(key) or "").expanduser()
        if config["model"].get(key) and path.is_dir():
            files += [str(p) for p in lister(path)]
    return files


def sections(*names, **partial):
    """The config keys a step depends on, passed as its params so that changing them (and nothing
    else) reruns it. Whole sections by name, or some keys of a section (estimator=["baseline"])."""
    out = {name: config[name] for name in names}
    out.update({name: {key: config[name][key] for key in keys} for name, keys in partial.items()})
    return out


def shard_paths(template, kind):
    """Every shard of batch ``kind`` (E or U) for a path template with a {shard} field."""
    return expand(template, shard=[f"{i:03d}" for i in range(config["batch_config"][f"{kind}_num_shards"])])


GPU = 1 if config["model"]["device"] == "cuda" else 0
ROLLOUT_CFG = sections("batch_config", "generation", "data", "reward", "model")
ESTIMATOR_KEYS = ["normalization", "baseline", "param_filter"]


# The optimizer state of update.optimizer: adamw is an input of the update steps (for
# optimizer_state: embedded it lies inside the policy directory, an input anyway). check_config
# has already refused a combination of the update keys that makes no sense.
UPDATE_STATE_PATHS = resolve_state_paths(config["update"], POLICY_DIR, EMBEDDED_MODEL)


def update_state_inputs(wildcards):
    if UPDATE_STATE_PATHS is None or config["update"]["optimizer_state"] == "embedded":
        return {}
    state, names = UPDATE_STATE_PATHS
    return {"optimizer_state": state, "optimizer_param_names": names}
