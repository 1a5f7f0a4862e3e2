"""Cached means cached: after the default run, each kind of config change schedules
exactly the jobs whose output it can change — an η sweep only the η stages (the fresh rollouts of
the new η included: one job per η and E shard), a U-only key only the U side and what follows it,
an E-only key only the E side, the entropy choice only the X side and the reductions (no
rollout, SNIS or fresh-rollout pass), a generation key everything from the rollouts, an execution
knob or a reordered config nothing — and a run forced through with other execution knobs reports
the same numbers.

Works on copies of the session's uninterrupted runs (conftest.default_run; the forced run on
conftest.test_config_run).
"""
from __future__ import annotations

import json
import random
import shutil

import pytest
import yaml
from conftest import RUN_CONFIG

from entropy_probe import stage_keys
from workflow_util import dry_run_jobs, json_numbers, run_snakemake

pytestmark = pytest.mark.workflow

# the jobs that follow a new v (two E shards, three η): its uses on the E side, the attribution
# and the report
AFTER_V = {"update_vector": 1, "directional": 2, "snis_shard": 2, "delta_h1": 1, "delta_h_snis": 1,
           "fresh_rollout": 6, "delta_h_sampler": 1, "exact_reference": 1, "attribution": 1, "summary": 1, "all": 1}
# the run's two update variants (dapo: its own objective and Y, its SNIS ΔH; adamw: the main Y;
# conftest), two E shards each: a variant's E passes, and what a new U batch reruns on the
# variants' side
VARIANT_DIRECTIONAL = {"variant_directional": 4}
VARIANT_SNIS = {"variant_snis_shard": 2}  # dapo only (snis: true)
VARIANT_E = VARIANT_DIRECTIONAL | VARIANT_SNIS
VARIANT_V = {"variant_update_vector": 2} | VARIANT_E
VARIANT_U = {"variant_u_objective": 1, "variant_teacher_force_y": 2, "variant_reduce_y": 1} | VARIANT_V
# a new η sweep: the SNIS passes (all η in one job per shard; a variant's only where it measures
# ΔH), the fresh rollouts of the new η only (two η x two E shards), the reductions, the exact
# reference and the report
NEW_ETAS = {"snis_shard": 2, "delta_h_snis": 1, "delta_h1": 1, "fresh_rollout": 4, "delta_h_sampler": 1,
            "exact_reference": 1, "summary": 1, "all": 1} | VARIANT_SNIS


@pytest.fixture(scope="module")
def cache_dir(default_run, tmp_path_factory):
    work = tmp_path_factory.mktemp("caching") / "run"
    shutil.copytree(default_run, work, symlinks=True)
    return work


def jobs_after(work, change: dict, name: str, base: str = RUN_CONFIG) -> dict[str, int]:
    config = yaml.safe_load((work / base).read_text())
    for dotted, value in change.items():
        section, key = dotted.split(".")
        config.setdefault(section, {})[key] = value
    (work / name).write_text(yaml.safe_dump(config))
    return dry_run_jobs(work, name)


def test_eta_sweep_reruns_only_the_eta_stages(cache_dir):
    jobs = jobs_after(cache_dir, {"estimator.eta_list": [2e-5, 2e-4]}, "eta.yaml")
    assert jobs == NEW_ETAS


def test_fresh_etas_rerun_only_what_they_define(cache_dir):
    """estimator.fresh_etas: a subset of the η already redrawn needs no fresh rollout (one file per
    η and shard), only the reduction, the exact reference and the report; [] drops the fresh
    stages from the report."""
    base = {"exact_reference": 1, "summary": 1, "all": 1}
    assert jobs_after(cache_dir, {"estimator.fresh_etas": [1e-5]}, "fresh_subset.yaml") == base | {"delta_h_sampler": 1}
    assert jobs_after(cache_dir, {"estimator.fresh_etas": [1e-5, 5e-5]}, "fresh_new.yaml") == base | {
        "delta_h_sampler": 1, "fresh_rollout": 2}
    assert jobs_after(cache_dir, {"estimator.fresh_etas": []}, "fresh_none.yaml") == base


def test_the_entropy_choice_reruns_no_pass_over_the_rollouts_but_x(cache_dir):
    """estimator.entropy: rollouts, SNIS and fresh-rollout shards hold both entropies; X, its
    directional pass and every reduction change."""
    jobs = jobs_after(cache_dir, {"estimator.entropy": "tempered_full"}, "entropy.yaml")
    assert jobs == {"e_stats": 1, "teacher_force_x": 2, "reduce_gradients": 1, "u_jackknife": 1, "directional": 2,
                    "delta_h1": 1, "delta_h_snis": 1, "delta_h_sampler": 1, "exact_reference": 1, "attribution": 1,
                    "summary": 1, "all": 1} | VARIANT_DIRECTIONAL


def test_a_u_only_key_leaves_the_e_side_alone(cache_dir):
    jobs = jobs_after(cache_dir, {"batch_config.B_U": 12}, "b_u.yaml")
    assert jobs == {"plan": 1, "rollout": 2, "u_objective": 1, "teacher_force_y": 2, "reduce_gradients": 1,
                    "u_jackknife": 1} | AFTER_V | VARIANT_U


def test_an_e_only_key_leaves_the_u_side_alone(cache_dir):
    jobs = jobs_after(cache_dir, {"batch_config.E_total_sequences": 1024}, "e_total.yaml")
    assert jobs == {"plan": 1, "rollout": 2, "e_stats": 1, "teacher_force_x": 2, "reduce_gradients": 1,
                    "u_jackknife": 1, "directional": 2, "snis_shard": 2, "delta_h1": 1, "delta_h_snis": 1,
                    "fresh_rollout": 6, "delta_h_sampler": 1, "summary": 1, "all": 1, "attribution": 1} | VARIANT_E


def test_a_generation_key_reruns_everything_from_the_rollouts(cache_dir):
    jobs = jobs_after(cache_dir, {"generation.temperature": 0.9}, "temperature.yaml")
    assert jobs == {"rollout": 4, "e_stats": 1, "u_objective": 1, "teacher_force_x": 2, "teacher_force_y": 2,
                    "reduce_gradients": 2, "u_jackknife": 1} | AFTER_V | VARIANT_U


def test_a_variant_change_reruns_only_that_variant(cache_dir):
    config = yaml.safe_load((cache_dir / RUN_CONFIG).read_text())
    variants = config["update"]["variants"]
    assert set(variants) == {"dapo", "adamw"}  # the run's variants (the sets below count them)
    jobs = jobs_after(cache_dir, {"update.variants": variants | {"adamw": variants["adamw"] | {"lr_factor": 0.2}}},
                      "variant_lr.yaml")
    assert jobs == {"variant_update_vector": 1, "variant_directional": 2, "summary": 1, "all": 1}
    # a new variant with a new loss: its own objective and Y; never X, never the main update
    jobs = jobs_after(cache_dir, {"update.variants": variants | {"bnpo": {"loss_type": "bnpo", "micro_batch_size": 8}}},
                      "variant_new.yaml")
    assert jobs == {"variant_u_objective": 1, "variant_teacher_force_y": 2, "variant_reduce_y": 1,
                    "variant_update_vector": 1, "variant_directional": 2, "summary": 1, "all": 1}
    # a variant with the main objective and the main rule reuses the main Y: only its v and E passes
    jobs = jobs_after(cache_dir, {"update.variants": variants | {"clip": {"max_grad_norm": 1.0}}}, "variant_clip.yaml")
    assert jobs == {"variant_update_vector": 1, "variant_directional": 2, "summary": 1, "all": 1}
    # switching a variant's SNIS sweep on runs that sweep only
    jobs = jobs_after(cache_dir, {"update.variants": variants | {"adamw": variants["adamw"] | {"snis": True}}},
                      "variant_snis.yaml")
    assert jobs == {"variant_snis_shard": 2, "summary": 1, "all": 1}
    # dropping the variants: only the report
    assert jobs_after(cache_dir, {"update.variants": {}}, "no_variants.yaml") == {"summary": 1, "all": 1}


# other layouts than the defaults (1024, 64, 64, 16, auto), not so small that the forced run is slow
EXECUTION = {"teacher_forcing.chunk_tokens": 100, "teacher_forcing.batch_size": 48, "generation.gen_batch_size": 24,
             "generation.rollout_batch_size": 5, "model.device": "cpu", "teacher_forcing.gradient_checkpointing": True,
             "generation.kv_cache": "static"}


@pytest.mark.parametrize("key", sorted(EXECUTION))
def test_an_execution_knob_schedules_nothing(cache_dir, key):
    assert key in stage_keys.EXECUTION_KEYS
    assert jobs_after(cache_dir, {key: EXECUTION[key]}, f"knob_{key}.yaml") == {}


def _shuffled(obj, rng):
    if not isinstance(obj, dict):
        return obj
    items = list(obj.items())
    rng.shuffle(items)
    return {k: _shuffled(v, rng) for k, v in items}


def test_the_same_config_with_its_keys_shuffled_schedules_nothing(cache_dir):
    config = yaml.safe_load((cache_dir / RUN_CONFIG).read_text())
    for seed in range(3):
        shuffled = _shuffled(config, random.Random(seed))
        assert list(shuffled) != list(config) or seed
        (cache_dir / "shuffled.yaml").write_text(yaml.safe_dump(shuffled, sort_keys=False))
        assert dry_run_jobs(cache_dir, "shuffled.yaml") == {}
    # 1 and 1.0 are one value
    config["generation"]["temperature"] = 1
    (cache_dir / "int.yaml").write_text(yaml.safe_dump(config))
    assert dry_run_jobs(cache_dir, "int.yaml") == {}


# what the forced run recomputes and compares: every number of the main path (the update
# variants' and the attribution's passes are the same passes along other directions)
FORCED_TARGETS = ("results/delta_h1.json", "results/delta_h_snis.json", "results/delta_h_sampler.json",
                  "results/estimates/exact.json", "results/estimates/u_jackknife.json")


def test_a_run_forced_through_with_other_execution_knobs_reports_the_same_numbers(test_config_run, tmp_path):
    """On a copy of the small test run (the knobs act the same at any size)."""
    base = test_config_run
    work = tmp_path / "knobs"
    shutil.copytree(base, work, symlinks=True)
    jobs_after(work, EXECUTION, "knobs.yaml", base="config.yaml")  # writes the config
    # every job up to the targets again, from the rollouts on
    targets = [t for t in FORCED_TARGETS if (base / t).exists()]  # the small run has no exact reference
    assert len(targets) == len(FORCED_TARGETS) - 1
    run_snakemake(work, "knobs.yaml", "--cores", "2", "--forcerun", "rollout", *targets, timeout=2400)
    for target in targets:
        old = json_numbers(json.loads((base / target).read_text()))
        new = json_numbers(json.loads((work / target).read_text()))
        assert old.keys() == new.keys(), target
        assert (work / target).stat().st_mtime > (base / target).stat().st_mtime, target  # recomputed
        for key, value in old.items():
            if key.endswith("/cost/seconds"):  # the fresh rollouts' wall time, not a number of the probe
                continue
            # itself a measure of rounding (X·v two ways), ~1e-7
            if key.endswith(("relative_difference", "difference_in_se")):
                assert new[key] < 1e-4, (target, key)
                continue
            # fp32 teacher forcing in other batch and chunk shapes: rounding, far below any SE
            assert new[key] == pytest.approx(value, rel=1e-4, abs=1e-7), (target, key)


DEFAULT_DAG = {"build_policy": 1, "prepare_data": 1, "plan": 2, "rollout": 4, "e_stats": 1, "u_objective": 1,
               "teacher_force_x": 2, "teacher_force_y": 2, "reduce_gradients": 2, "u_jackknife": 1, "update_vector": 1,
               "directional": 2, "snis_shard": 2, "delta_h1": 1, "delta_h_snis": 1, "exact_reference": 1, "summary": 1,
               "all": 1, "fresh_rollout": 6, "delta_h_sampler": 1, "attribution": 1, "variant_u_objective": 1,
               "variant_teacher_force_y": 2, "variant_reduce_y": 1, "variant_update_vector": 2, "variant_directional": 4,
               "variant_snis_shard": 2}


def test_the_default_config_runs_no_checkpoint_rule(tmp_path):
    """Trainer checkpoints add rules (step_comparison, trajectory, results/pairs/): the default
    config's DAG has none of them, its layout is unchanged."""
    from conftest import write_run_config

    write_run_config(tmp_path)
    assert dry_run_jobs(tmp_path, RUN_CONFIG) == DEFAULT_DAG
