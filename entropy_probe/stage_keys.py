"""Which config keys define each stage's output: the rules' ``params`` and the stages' view of
the config.

A rule reruns when its params change, so each rule's params hold exactly the values that define
its output (:data:`STAGE_KEYS`), in a canonical form (sorted keys, numbers as the schema types
them), so that neither the key order of the config file nor an unrelated key of the same section
reruns it. Pure execution knobs (:data:`EXECUTION_KEYS`: device, batch and chunk sizes) change no
stored number beyond float rounding and are no rule's params: a stage reads them from the config
as it stands. A stage sees only its defining keys, the execution knobs and the keys it reads to
decide whether to stop (:data:`GUARD_KEYS`) (:func:`stage_config`): reading any other key is a
KeyError, so a stage cannot silently depend on a value its cache does not track.

E-side stages never list U-side keys and the other way round (a test checks it). Torch-free: the
Snakefile imports this while it parses.
"""
from __future__ import annotations

import json

from .config_schema import number_keys
from .sweep import fresh_etas

SAMPLING = ("generation.temperature", "generation.top_p", "generation.max_new_tokens", "generation.stop_strings")
# what a rollout shard's header records and every reader of it checks (entropy_probe.stages.inputs)
ROLLOUT_PROVENANCE = SAMPLING + ("batch_config.seed", "batch_config.G", "model.precision")
REWARD = ("reward.name", "reward.function", "reward.format_weight")
PASS_NUMERICS = ("model.dtype", "model.trainable", "model.param_filter")  # + model.precision (provenance)
X_ESTIMATOR = ("estimator.normalization", "estimator.baseline", "estimator.pathwise_term", "estimator.entropy")
UPDATE_RULE = ("update.optimizer", "update.optimizer_state", "update.optimizer_param_names", "update.max_grad_norm",
               "model.name_or_path", "model.dtype", "model.checkpoint", "model.trainable", "update.next_checkpoint",
               "model.param_filter")
ETA_SWEEP = ("estimator.eta_list", "estimator.central_difference")

STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "build_policy": ("toy.seed", "toy.max_operand", "toy.target_accuracy", "toy.max_steps"),
    "policy_spec": ("model.name_or_path", "model.adapter_path", "model.trust_remote_code", "model.checkpoint"),
    "prepare_data": ("data.source", "data.config_name", "data.prompt_field", "data.answer_field",
                     "data.answer_pattern", "data.prompt_template", "data.use_chat_template", "data.system_prompt",
                     "data.max_prompt_tokens"),
    "plan_E": ("batch_config.seed", "batch_config.G", "batch_config.E_total_sequences",
               "batch_config.E_sampling_mode", "batch_config.E_num_shards"),
    "plan_U": ("batch_config.seed", "batch_config.B_U", "batch_config.U_num_shards"),
    "rollout": ROLLOUT_PROVENANCE + REWARD + ("model.dtype",),
    "e_stats": ROLLOUT_PROVENANCE + ("estimator.entropy",),
    "u_objective": ROLLOUT_PROVENANCE + ("update.scale_rewards", "update.loss_type", "update.max_completion_length",
                                         "update.loss_scale_factor", "update.micro_batch_size"),
    "teacher_force_x": ROLLOUT_PROVENANCE + PASS_NUMERICS + X_ESTIMATOR,
    "teacher_force_y": ROLLOUT_PROVENANCE + PASS_NUMERICS,
    "update_vector": UPDATE_RULE,
    "u_jackknife": UPDATE_RULE,
    "directional": ROLLOUT_PROVENANCE + PASS_NUMERICS + X_ESTIMATOR,
    "delta_h1": ("estimator.eta_list", "batch_config.G"),
    "snis_shard": ROLLOUT_PROVENANCE + ETA_SWEEP + ("model.dtype",),
    "delta_h_snis": ("estimator.normalization", "estimator.entropy", "batch_config.G"),
    # one job per (η, E shard): the η is the job's wildcard (results/fresh/eta_<η>/), not a param,
    # so a new η runs only its own jobs; both entropies are recorded, the reduction chooses
    "fresh_rollout": ROLLOUT_PROVENANCE + ("model.dtype",),
    "delta_h_sampler": ("estimator.fresh_etas", "estimator.normalization", "estimator.entropy", "batch_config.G"),
    "exact_reference": SAMPLING + ETA_SWEEP + ("estimator.fresh_etas", "estimator.normalization",
                                              "estimator.entropy", "model.dtype"),
    # the probe's own AdamW step (checkpoint's state, U batch's Y) against the trainer's step
    "step_comparison": ("model.checkpoint", "model.trainable", "model.dtype", "update.max_grad_norm"),
    "trajectory": (),  # reads the pairs' summaries only
    # the forward pass over the U shards along J·X (J = ∂v/∂Y), the token shares of both batches,
    # the U-batch SE and the covariance view
    "attribution": ROLLOUT_PROVENANCE + PASS_NUMERICS + UPDATE_RULE + X_ESTIMATOR,
}
# The per-variant stages (entropy_probe.variants; wildcard {variant}, or {objective} for the Y of
# a loss that differs from the main one). Their keys are looked up in the variant's effective
# config (the overrides applied, plus its section `variant`), so each rule's params are exactly
# that variant's defining values; the stages are the main ones.
VARIANT_STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "variant_u_objective": STAGE_KEYS["u_objective"],
    "variant_teacher_force_y": STAGE_KEYS["teacher_force_y"],
    "variant_update_vector": UPDATE_RULE + ("variant.name", "variant.lr_factor"),  # the name: in v's header
    # the directional sums of one E shard along the variant's v; its SNIS pass (opt-in: snis: true)
    "variant_directional": STAGE_KEYS["directional"],
    "variant_snis_shard": STAGE_KEYS["snis_shard"],
}
# The summary records every defining value (its params: the union of all main stages' keys, and
# the variants it compares).
STAGE_KEYS["summary"] = tuple(sorted({key for keys in STAGE_KEYS.values() for key in keys} | {"update.variants"}))
STAGE_KEYS.update(VARIANT_STAGE_KEYS)

# Change no stored number beyond float rounding (tests hold the summary to that): read, not tracked.
EXECUTION_KEYS = ("model.device", "generation.rollout_batch_size", "generation.gen_batch_size",
                  "generation.kv_cache", "generation.fresh_rollouts", "teacher_forcing.batch_size", "teacher_forcing.chunk_tokens",
                  "teacher_forcing.gradient_checkpointing")
# Read to decide whether the run stops, never to compute a number: read, not tracked.
GUARD_KEYS: dict[str, tuple[str, ...]] = {
    # a U batch without signal stops an SGD run before any teacher forcing
    "u_objective": ("update.optimizer",),
}
# Decide which files exist (the DAG), not what a file holds: no stage reads them as values.
STRUCTURE_KEYS = ("data.split", "data.E_split", "data.U_split", "model.checkpoints")

# The two batches: a stage of one side never depends on the other side's keys.
U_ONLY_KEYS = ("batch_config.B_U", "batch_config.U_num_shards", "update.scale_rewards", "data.U_split",
               "update.loss_type", "update.max_completion_length", "update.loss_scale_factor",
               "update.micro_batch_size", "update.optimizer", "update.optimizer_state",
               "update.optimizer_param_names", "update.max_grad_norm", "update.next_checkpoint", "update.variants")
E_ONLY_KEYS = ("batch_config.E_total_sequences", "batch_config.E_sampling_mode", "batch_config.E_num_shards",
               "data.E_split", "estimator.normalization", "estimator.baseline", "estimator.pathwise_term",
               "estimator.entropy", "estimator.fresh_etas")
E_SIDE_STAGES = ("plan_E", "e_stats", "teacher_force_x", "fresh_rollout", "delta_h_sampler")
U_SIDE_STAGES = ("plan_U", "u_objective", "teacher_force_y", "update_vector", "u_jackknife", "step_comparison",
                 "variant_u_objective", "variant_teacher_force_y", "variant_update_vector")


def lookup(config: dict, dotted: str):
    section, key = dotted.split(".", 1)
    return config[section][key]


# keys whose defining value is derived from the config (a null resolved), not the raw value
_DERIVED = {"estimator.fresh_etas": lambda config: fresh_etas(config["estimator"])}


# values spelled in two ways (entropy_probe.losses.scale_mode reads both)
_SYNONYMS = {"update.scale_rewards": {True: "group", False: "none"}}


# numbers inside the variants map (update.variants.<name>.<key>): 1 and 1.0 are one value
_VARIANT_NUMBERS = ("lr_factor", "max_grad_norm", "loss_scale_factor")


def _canonical(dotted: str, value):
    if dotted == "update.variants":
        return {name: {k: (float(v) if k in _VARIANT_NUMBERS else
                           _canonical("update.scale_rewards", v) if k == "scale_rewards" else v)
                       for k, v in (overrides or {}).items()} for name, overrides in (value or {}).items()}
    if dotted in _SYNONYMS and not isinstance(value, (list, dict)):
        return _SYNONYMS[dotted].get(value, value)
    if dotted in number_keys():
        if isinstance(value, list):
            return [float(x) for x in value]
        return float(value)
    return value


def defining_values(config: dict, stage: str) -> dict:
    """{dotted key: value} of the keys that define ``stage``'s output, canonical."""
    return {key: _canonical(key, _DERIVED[key](config) if key in _DERIVED else lookup(config, key))
            for key in STAGE_KEYS[stage]}


def rule_params(config: dict, stage: str) -> str:
    """The canonical params string of a rule: its defining values as sorted, compact JSON."""
    return json.dumps(defining_values(config, stage), sort_keys=True, separators=(",", ":"))


def nest(flat: dict) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    out: dict = {}
    for dotted, value in flat.items():
        section, key = dotted.split(".", 1)
        out.setdefault(section, {})[key] = value
    return out


def stage_config(defining: dict | str, full_config: dict, stage: str | None = None) -> dict:
    """What a stage sees: its defining values (a dict, or the rule's params string), the
    execution knobs and the guard keys of ``stage`` from the full config, as a nested config dict
    with nothing else in it."""
    flat = json.loads(defining) if isinstance(defining, str) else dict(defining)
    flat |= {key: lookup(full_config, key) for key in EXECUTION_KEYS + GUARD_KEYS.get(stage, ())}
    return nest(flat)


def stage_config_from(full_config: dict, stage: str) -> dict:
    """:func:`stage_config` of a full (validated) config, for running a stage by hand."""
    return stage_config(defining_values(full_config, stage), full_config, stage)
