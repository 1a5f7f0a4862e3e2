"""The rules' params (entropy_probe.stage_keys): every config key is accounted for, the two batches
never depend on each other's keys, execution knobs are no rule's params, and the params string is
canonical (key order and 1 vs 1.0 do not matter)."""
from __future__ import annotations

import json

import pytest

from entropy_probe import config_schema, stage_keys
from entropy_probe.config import load_config

SCHEMA = config_schema.schema()
SCHEMA_KEYS = {f"{section}.{key}" for section, sub in SCHEMA["properties"].items()
               for key in sub.get("properties", {})}
# a variant's effective config adds its own section (entropy_probe.variants): its name and lr factor
VARIANT_KEYS = {"variant.name", "variant.lr_factor"}
MAIN_STAGES = [stage for stage in stage_keys.STAGE_KEYS if stage not in stage_keys.VARIANT_STAGE_KEYS]


def test_every_key_of_a_stage_is_a_config_key():
    for stage, keys in stage_keys.STAGE_KEYS.items():
        allowed = SCHEMA_KEYS | (VARIANT_KEYS if stage in stage_keys.VARIANT_STAGE_KEYS else set())
        assert set(keys) <= allowed, (stage, sorted(set(keys) - allowed))
    assert set(stage_keys.EXECUTION_KEYS) <= SCHEMA_KEYS and set(stage_keys.STRUCTURE_KEYS) <= SCHEMA_KEYS


def test_every_config_key_defines_an_output_or_is_an_execution_or_structure_key():
    used = set(stage_keys.STAGE_KEYS["summary"])
    unaccounted = SCHEMA_KEYS - used - set(stage_keys.EXECUTION_KEYS) - set(stage_keys.STRUCTURE_KEYS)
    assert not unaccounted, f"config keys no stage reads and no rule tracks: {sorted(unaccounted)}"
    assert not used & set(stage_keys.EXECUTION_KEYS)  # an execution knob reruns nothing


def test_e_side_and_u_side_stages_never_share_the_other_sides_keys():
    for stage in stage_keys.E_SIDE_STAGES:
        assert not set(stage_keys.STAGE_KEYS[stage]) & set(stage_keys.U_ONLY_KEYS), stage
    for stage in stage_keys.U_SIDE_STAGES:
        assert not set(stage_keys.STAGE_KEYS[stage]) & set(stage_keys.E_ONLY_KEYS), stage


def test_params_are_canonical():
    config = load_config()
    reordered = {section: dict(reversed(list(values.items()))) for section, values in reversed(list(config.items()))}
    reordered["generation"]["temperature"] = 1  # the int spelling of 1.0
    reordered["estimator"]["eta_list"] = [float(e) for e in config["estimator"]["eta_list"]]
    for stage in MAIN_STAGES:
        assert stage_keys.rule_params(reordered, stage) == stage_keys.rule_params(config, stage), stage
    config["update"]["scale_rewards"] = True
    grouped = dict(config, update=dict(config["update"], scale_rewards="group"))
    assert stage_keys.rule_params(config, "u_objective") == stage_keys.rule_params(grouped, "u_objective")
    values = json.loads(stage_keys.rule_params(config, "rollout"))
    assert list(values) == sorted(values) and set(values) == set(stage_keys.STAGE_KEYS["rollout"])


def test_a_stage_sees_only_its_keys_and_the_execution_knobs():
    config = load_config()
    view = stage_keys.stage_config_from(config, "plan_U")
    assert view["batch_config"]["B_U"] == config["batch_config"]["B_U"]
    assert view["teacher_forcing"]["batch_size"] == config["teacher_forcing"]["batch_size"]  # an execution knob
    with pytest.raises(KeyError):
        view["batch_config"]["E_total_sequences"]  # an E key: the U plan must not depend on it
