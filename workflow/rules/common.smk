# Config validation first (keys that moved, the schema: types, ranges, defaults; then each
# section's own checks), so a bad value fails in one line before any job runs; then the paths and
# helpers every rule shares.
import os
import re
import sys
from pathlib import Path

from snakemake.utils import validate

# The entropy_probe package of this checkout, for the Snakefile and for every job's script (also
# when it is not pip-installed, or another checkout is): jobs inherit the environment.
# (set, not required from the user: no envvars directive)
sys.path.insert(0, workflow.basedir)
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        p for p in (workflow.basedir, os.getenv("PYTHONPATH")) if p
    )
)

from entropy_probe import data as probe_data
from entropy_probe import variants as probe_variants
from entropy_probe.config import ConfigError, check_config, honour_user_mappings
from entropy_probe.config_schema import check_finite, check_renamed, dotted_path
from entropy_probe.input_files import (
    EMBEDDED,
    adapter_files,
    checkpoint_files,
    resolve_state_paths,
)
from entropy_probe.prompts import prepared_name
from entropy_probe.model_config import (
    CHECKPOINT_DIFF,
    compares_steps,
    is_embedded,
    policy_layout,
    state_checks,
    trajectory_pairs,
)
from entropy_probe.stage_keys import rule_params
from entropy_probe.sweep import eta_tag, fresh_etas
from entropy_probe.trainer_files import read_layout

honour_user_mappings(config, workflow.overwrite_configfiles)
try:
    check_renamed(config)
    check_finite(config)  # a NaN or an infinity passes the schema's type and range checks
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
    raise WorkflowError(f"Invalid config: {dotted_path(bad.absolute_path)}: {bad.message}")
try:
    check_config(config)
except ConfigError as err:
    raise WorkflowError(f"Invalid config: {err}")

# Every rule runs its stage of the package (entropy_probe.stages, looked up by the rule's name).
STAGE = "../../scripts/run_stage.py"

RESULTS_ROOT = "results"
# A trajectory (model.checkpoints): one probe per pair of consecutive checkpoints, every stage of
# it under results/pairs/<pair>/ (the {pair} wildcard) with that pair's config; otherwise one
# probe under results/.
PAIR_CONFIGS = trajectory_pairs(config)
RESULTS = f"{RESULTS_ROOT}/pairs/{{pair}}" if PAIR_CONFIGS else RESULTS_ROOT
if PAIR_CONFIGS:

    wildcard_constraints:
        pair="|".join(re.escape(pair) for pair in PAIR_CONFIGS),


EMBEDDED_MODEL = is_embedded(config["model"])
# What every rule's `policy` input is: the embedded policy's directory, or the policy spec
# (policy_spec rule: the resolved checkpoint, adapter and fingerprint) of a configured model.
POLICY = f"{RESULTS}/policy" if EMBEDDED_MODEL else f"{RESULTS}/policy.json"
# The prepared prompt set of each batch's split (prepare_data rule, one job per split).
SPLIT_OF_KIND = probe_data.kind_splits(config["data"])
SPLIT_OF_NAME = {prepared_name(s): s for s in SPLIT_OF_KIND.values()}
PREPARED = {
    kind: f"{RESULTS}/data/{prepared_name(split)}.json"
    for kind, split in SPLIT_OF_KIND.items()
}
# The embedded policy is small enough to enumerate every response: its exact ΔH(η) is drawn too.
EXACT_REFERENCE = (
    EMBEDDED_MODEL
    and config["generation"]["max_new_tokens"] <= 4
    and not config["generation"]["stop_strings"]
)
# The η of the fresh rollouts (ΔH of the sampler itself); none: no fresh-rollout jobs.
FRESH_ETAS = fresh_etas(config["estimator"])
# Model stages: one GPU each with model.device: cuda (on a cluster the profile's set-resources
# asks for it); `--set-threads RULE=N` (or a profile) changes a rule's threads. The embedded
# policy is so small that its passes are per-op overhead: one thread each is faster, and leaves
# the other cores to other jobs (measured: the .test run 200 s against 273 s on 2 cores).
GPU = 1 if config["model"]["device"] == "cuda" else 0
MODEL_THREADS = 1 if EMBEDDED_MODEL else 2


def config_of(wildcards):
    """The config of a job: its pair's in a trajectory, else the config."""
    return PAIR_CONFIGS[wildcards.pair] if PAIR_CONFIGS else config


def params_of(stage, wildcards=None):
    """A rule's params: the values that define its output, canonical (entropy_probe.stage_keys);
    in a trajectory a function of the job's pair (or, given ``wildcards``, that job's values).
    Always a function, so that Snakemake does not format the JSON text with the job's wildcards
    (a data.source with {split} in it would be rewritten)."""
    if wildcards is not None:
        return rule_params(config_of(wildcards), stage)
    if PAIR_CONFIGS:
        return lambda wildcards: rule_params(PAIR_CONFIGS[wildcards.pair], stage)
    values = rule_params(config, stage)
    return lambda wildcards: values


def every_run(paths):
    """Paths of one probe (with {pair} in a trajectory) for each of its probes."""
    return expand(paths, pair=list(PAIR_CONFIGS)) if PAIR_CONFIGS else paths


def local_model_files(wildcards):
    """The local checkpoint and adapter files the policy spec depends on (hub ids: none); of a
    trainer checkpoint, its files (scheduler and trainer state included: the learning rate) and
    an adapter's base model."""
    model = config_of(wildcards)["model"]
    layout = policy_layout(config_of(wildcards))
    if layout is None:
        files = []
        sources = [
            (model["name_or_path"], checkpoint_files),
            (model.get("adapter_path"), adapter_files),
        ]
    else:
        files = layout.input_files()
        base = model["name_or_path"]
        base = base if base != EMBEDDED else layout.base_model
        sources = [(base, checkpoint_files)] if layout.kind == "adapter" else []
    for value, lister in sources:
        path = Path(value or "").expanduser()
        if value and path.is_dir():
            files += [str(p) for p in lister(path)]
    return files


def previous_rollout(wildcards):
    """In a trajectory (generation.fresh_rollouts: verification), an E shard's counterpart at the
    checkpoint before: the same shard of the previous pair, whose checkpoint precedes this pair's,
    drawn with the same slots and noise; redrawn from it by verification (one teacher-forced pass
    and what changed). Nothing for the first pair, the U batch, or pairs that draw differently."""
    if not PAIR_CONFIGS or wildcards.kind != "E" or config["generation"]["fresh_rollouts"] != "verification":
        return {}
    pairs = list(PAIR_CONFIGS)
    position = pairs.index(wildcards.pair)
    if position == 0:
        return {}
    before, this = PAIR_CONFIGS[pairs[position - 1]], PAIR_CONFIGS[wildcards.pair]
    if any(rule_params(before, stage) != rule_params(this, stage) for stage in ("rollout", "plan_E", "prepare_data")):
        return {}
    return {
        "previous": f"{RESULTS_ROOT}/pairs/{pairs[position - 1]}/rollouts/E/shard_{wildcards.shard}.safetensors"
    }


def shard_paths(template, kind):
    """Every shard of batch ``kind`` (E or U) for a path template with a {shard} field."""
    return expand(
        template,
        shard=[f"{i:03d}" for i in range(config["batch_config"][f"{kind}_num_shards"])],
        allow_missing=True,
    )


def benchmark_path(name):
    """Per-job benchmark file (wall time, peak memory) of a stage, for sizing resources."""
    return f"{RESULTS}/benchmarks/{name}.tsv"


# The optimizer state of update.optimizer: adamw is an input of the update steps (for
# optimizer_state: embedded it lies inside the policy directory, an input anyway). check_config
# has already refused a combination of the update keys that makes no sense.
UPDATE_STATE_PATHS = resolve_state_paths(config["update"], POLICY, EMBEDDED_MODEL)


def update_state_inputs(wildcards):
    layout = policy_layout(config_of(wildcards))
    # a trainer checkpoint: its own optimizer.pt or optimizer_0/ (check_config allows no other)
    if layout is not None:
        adamw = config_of(wildcards)["update"]["optimizer"] == "adamw"
        return {"optimizer_state": layout.optimizer_files()} if adamw else {}
    if UPDATE_STATE_PATHS is None or config["update"]["optimizer_state"] == "embedded":
        return {}
    state, names = UPDATE_STATE_PATHS
    return {"optimizer_state": state, "optimizer_param_names": names}


# What-if over update rules (update.variants, entropy_probe.variants): each variant's stages run
# on its effective config (its params: rule_params of that config); a variant whose objective is
# the main one reuses the main Y, variants sharing an objective share one Y ({objective} wildcard).
# Variants do not apply to a checkpoint difference: skipped with a note (variants.skipped_note).
VARIANTS = probe_variants.names(config)
SNIS_VARIANTS = probe_variants.with_snis(config)
VARIANT_CONFIG = {
    name: probe_variants.variant_config(config, name) for name in VARIANTS
}
MAIN_OBJECTIVE = probe_variants.objective_id(config)
VARIANT_OBJECTIVE = {
    name: probe_variants.objective_id(c) for name, c in VARIANT_CONFIG.items()
}
OBJECTIVE_CONFIG = {
    oid: VARIANT_CONFIG[name]
    for name, oid in VARIANT_OBJECTIVE.items()
    if oid != MAIN_OBJECTIVE
}


def variant_params(stage):
    """A variant rule's params: its stage's defining values in the variant's effective config."""
    return lambda wc: rule_params(VARIANT_CONFIG[wc.variant], stage)


def objective_params(stage):
    return lambda wc: rule_params(OBJECTIVE_CONFIG[wc.objective], stage)


def variant_y(wc):
    """The Y of a variant: the main one when its objective is the main objective."""
    oid = VARIANT_OBJECTIVE[wc.variant]
    if oid == MAIN_OBJECTIVE:
        return f"{RESULTS}/gradients/Y.safetensors"
    return f"{RESULTS}/variants/objectives/{oid}/gradients/Y.safetensors"


def variant_state_inputs(wc):
    """The optimizer state files of a variant's update (as update_state_inputs for the main)."""
    upd = VARIANT_CONFIG[wc.variant]["update"]
    paths = resolve_state_paths(upd, POLICY, EMBEDDED_MODEL)
    if paths is None or upd["optimizer_state"] == "embedded":
        return {}
    return {"optimizer_state": paths[0], "optimizer_param_names": paths[1]}


def variant_files(template, kind=None, names=None):
    """``template`` (with {variant}, and {shard} when ``kind`` names a batch) for every variant
    (or those ``names``)."""
    out = []
    for name in VARIANTS if names is None else names:
        path = template.replace("{variant}", name)
        out += shard_paths(path, kind) if kind else [path]
    return out


def update_vector_inputs(wildcards):
    """v from the U batch's Y (and the optimizer state), or from the next checkpoint."""
    update = config_of(wildcards)["update"]
    if update["optimizer"] == CHECKPOINT_DIFF:
        return {"next_checkpoint": read_layout(update["next_checkpoint"]).input_files()}
    return update_state_inputs(wildcards) | {"Y": f"{RESULTS}/gradients/Y.safetensors"}


# The probe's own AdamW step compared with the trainer's (checkpoint_diff with an optimizer state).
STEP_COMPARISON = f"{RESULTS}/update/step_comparison.json"
COMPARES_STEPS = any(compares_steps(c) for c in (PAIR_CONFIGS or {"": config}).values())


def summary_inputs(wildcards):
    """The exact reference (embedded policy); the U batch behind v (not for a checkpoint
    difference), with the attribution of δH₁ to its tokens; the comparison of the probe's AdamW
    step with the trainer's (where it is made); the sampler's ΔH (fresh rollouts, when
    estimator.fresh_etas is not []); the update variants' v and E passes (update.variants).
    """
    cfg = config_of(wildcards)
    inputs = {"exact": f"{RESULTS}/estimates/exact.json"} if EXACT_REFERENCE else {}
    if cfg["update"]["optimizer"] != CHECKPOINT_DIFF:
        inputs |= {
            "u_jackknife": f"{RESULTS}/estimates/u_jackknife.json",
            "u_objective": f"{RESULTS}/estimates/u_objective.safetensors",
            "attribution_summary": f"{RESULTS}/attribution/attribution.json",
        }
    if VARIANTS:
        inputs |= {
            "X": f"{RESULTS}/gradients/X.safetensors",
            "v": f"{RESULTS}/update/v.safetensors",
            "variant_v": variant_files(f"{RESULTS}/variants/{{variant}}/v.safetensors"),
            "variant_directional": variant_files(
                f"{RESULTS}/variants/{{variant}}/directional/shard_{{shard}}.safetensors",
                "E",
            ),
            "variant_snis": variant_files(
                f"{RESULTS}/variants/{{variant}}/snis/shard_{{shard}}.safetensors",
                "E",
                SNIS_VARIANTS,
            ),
        }
    if compares_steps(cfg):
        inputs["step_comparison"] = STEP_COMPARISON
    if FRESH_ETAS:
        inputs["delta_h_sampler"] = f"{RESULTS}/delta_h_sampler.json"
    return inputs


def costed_inputs(wildcards):
    """The files holding the model jobs' costs that the summary does not read otherwise: the
    rollouts, the reduced gradients (their temporary shards' costs), the fresh rollouts and the
    variants' own Y."""
    cfg = config_of(wildcards)
    paths = shard_paths(f"{RESULTS}/rollouts/E/shard_{{shard}}.safetensors", "E")
    if cfg["update"]["optimizer"] != CHECKPOINT_DIFF:
        paths += shard_paths(f"{RESULTS}/rollouts/U/shard_{{shard}}.safetensors", "U")
    paths.append(f"{RESULTS}/gradients/X.safetensors")
    if cfg["update"]["optimizer"] != CHECKPOINT_DIFF:
        paths.append(f"{RESULTS}/gradients/Y.safetensors")
    for eta in FRESH_ETAS:
        paths += shard_paths(
            f"{RESULTS}/fresh/eta_{eta_tag(eta)}/shard_{{shard}}.safetensors", "E"
        )
    for oid in sorted(OBJECTIVE_CONFIG):
        paths.append(f"{RESULTS}/variants/objectives/{oid}/gradients/Y.safetensors")
    return paths


SKIPPED_VARIANTS = probe_variants.skipped_note(config)
