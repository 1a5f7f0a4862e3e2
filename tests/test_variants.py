"""What-if over update rules (update.variants): each variant's v is the v of a run with the
variant's overrides as the main update (times its lr_factor), X is computed once however many
variants there are, and the config checks name the variant.

Works on copies of the session's uninterrupted default run (conftest.default_run), whose config
has two variants (dapo: its own objective; adamw: the main Y, lr_factor 0.02)."""
from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from conftest import REPO, RUN_CONFIG

from entropy_probe import shards, variants
from entropy_probe.config import ConfigError, load_config
from workflow_util import dry_run_jobs, run_snakemake


@pytest.mark.workflow
@pytest.mark.parametrize("name", ["dapo", "adamw"])
def test_a_variants_v_is_the_main_update_of_a_run_with_its_overrides(default_run, tmp_path, name):
    work = tmp_path / "run"
    shutil.copytree(default_run, work, symlinks=True)
    config = yaml.safe_load((work / RUN_CONFIG).read_text())
    overrides = dict(config["update"]["variants"][name])
    lr_factor = overrides.pop("lr_factor", 1.0)
    effective = variants.variant_config(config, name)
    config["update"] = {k: v for k, v in effective["update"].items()} | {"variants": {}}
    (work / "as_main.yaml").write_text(yaml.safe_dump(config))
    run_snakemake(work, "as_main.yaml", "--cores", "2", "results/update/v.safetensors")
    as_main, main_meta = shards.read_shard(work / "results" / "update" / "v.safetensors", {"kind": "v"})
    variant, variant_meta = shards.read_shard(default_run / "results" / "variants" / name / "v.safetensors",
                                              {"kind": "v"})
    assert variant_meta["lr_factor"] == lr_factor and main_meta["optimizer"] == variant_meta["optimizer"]
    assert set(variant) == set(as_main)
    for key in as_main:  # float64 vectors from the same float64 Y: equal up to rounding
        torch.testing.assert_close(variant[key], lr_factor * as_main[key], rtol=1e-12, atol=0.0)


@pytest.mark.workflow
def test_x_is_computed_once_whatever_the_variants(tmp_path):
    """A dry run from scratch with three variants (two new losses) schedules X's teacher forcing
    once per E shard and reduces X once."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["update"]["variants"] = {"dapo": {"loss_type": "dapo"}, "drgrpo": {"loss_type": "dr_grpo"},
                                    "adamw": {"optimizer": "adamw", "optimizer_state": "embedded"}}
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "three.yaml").write_text(yaml.safe_dump(config))
    jobs = dry_run_jobs(tmp_path, "three.yaml")
    E = config["batch_config"]["E_num_shards"]
    U = config["batch_config"]["U_num_shards"]
    assert jobs["teacher_force_x"] == E and jobs["reduce_gradients"] == 2  # X and the main Y, once each
    assert jobs["variant_teacher_force_y"] == 2 * U and jobs["variant_reduce_y"] == 2  # dapo, dr_grpo
    assert jobs["variant_update_vector"] == 3
    assert jobs["variant_directional"] == 3 * E and "variant_snis_shard" not in jobs  # SNIS is opt-in


@pytest.mark.parametrize("overrides,key", [
    ({"bad name": {"loss_type": "dapo"}}, "update.variants"),
    ({"main": {"loss_type": "dapo"}}, "update.variants.main"),
    ({"x": {"loss_type": "bnpo"}}, "update.variants.x"),  # bnpo needs micro_batch_size
    ({"x": {"lr_factor": 0}}, "update.variants.x.lr_factor"),
    ({"x": {"learning_rate": 2}}, "update.variants.x"),
    ({"x": {"optimizer_state": "embedded"}}, "update.variants.x"),  # a state with sgd
])
def test_bad_variants_are_config_errors_naming_the_variant(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "config" / "config.yaml", {"update": {"variants": overrides}})
    assert key in str(info.value)


def test_variant_config_and_objectives():
    config = load_config(REPO / "config" / "config.yaml", {"update": {
        "optimizer": "adamw", "optimizer_state": "embedded",
        "variants": {"sgd": {"optimizer": "sgd"}, "half": {"lr_factor": 0.5}, "dapo": {"loss_type": "dapo"},
                     "dapo_std": {"loss_type": "dapo", "scale_rewards": True}}}})
    sgd = variants.variant_config(config, "sgd")
    # overriding the optimizer drops the main's state (it belongs to adamw)
    assert sgd["update"]["optimizer"] == "sgd" and sgd["update"]["optimizer_state"] == ""
    assert variants.variant_config(config, "half")["variant"] == {"name": "half", "lr_factor": 0.5}
    assert variants.variant_config(config, "dapo_std")["update"]["scale_rewards"] is True
    ids = {name: variants.objective_id(variants.variant_config(config, name)) for name in variants.names(config)}
    main = variants.objective_id(config)
    assert ids["sgd"] == ids["half"] == main  # same loss: the main Y
    assert len({main, ids["dapo"], ids["dapo_std"]}) == 3
    # the variant schema's loss types are the main key's
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    update = schema["properties"]["update"]["properties"]
    assert update["variants"]["additionalProperties"]["properties"]["loss_type"]["enum"] == update["loss_type"]["enum"]
    assert set(update["variants"]["additionalProperties"]["properties"]) == set(variants.OVERRIDES) | {"lr_factor", "snis"}
