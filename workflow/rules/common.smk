# Config validation first (schema: types, ranges, defaults; then cross-field checks), so a bad
# value fails before any job runs; then the paths every rule shares.
import sys

from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)  # the entropy_probe package, also when not pip-installed

from entropy_probe.config import ConfigError, EMBEDDED, check_config, dataset_size


validate(config, "../schemas/config.schema.yaml")
try:
    check_config(config)
except ConfigError as err:
    raise WorkflowError(f"Invalid config: {err}")

RESULTS = "results"
EMBEDDED_MODEL = config["model"]["name_or_path"] == EMBEDDED
POLICY_DIR = f"{RESULTS}/policy" if EMBEDDED_MODEL else config["model"]["name_or_path"]
DATASET_SIZE = dataset_size(config)
# The embedded policy is small enough to enumerate every response: its exact ΔH(η) is drawn too.
EXACT_REFERENCE = EMBEDDED_MODEL and config["generation"]["max_new_tokens"] <= 4


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
# optimizer_state: embedded it lies inside the policy directory, an input anyway).
from entropy_probe.optimizer_state import resolve_state_paths

try:
    UPDATE_STATE_PATHS = resolve_state_paths(config["update"], POLICY_DIR, EMBEDDED_MODEL)
except ValueError as err:
    raise WorkflowError(f"Invalid config: {err}")


def update_state_inputs(wildcards):
    if UPDATE_STATE_PATHS is None or config["update"]["optimizer_state"] == "embedded":
        return {}
    state, names = UPDATE_STATE_PATHS
    return {"optimizer_state": state, "optimizer_param_names": names}
