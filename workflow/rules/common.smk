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


def sections(*names):
    """The config sections a rule uses, as its params: changing them reruns the rule."""
    return {name: config[name] for name in names}
