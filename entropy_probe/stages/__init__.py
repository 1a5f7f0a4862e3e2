"""The stage layer: one function per rule of the workflow (``workflow/rules/<family>.smk`` ↔
``entropy_probe/stages/<family>.py``), each taking the stage's view of the config and the paths
of the files it reads and writes (:mod:`entropy_probe.stage`). Every rule runs
``scripts/run_stage.py``, which looks its stage up here; ``python -m entropy_probe run STAGE``
runs one by hand."""
from __future__ import annotations

from ..stage import Stage
from . import attribution, checkpoint, fresh, plan, policy, report, rollout, statistics, teacher_force, update, variants

# rule name -> its stage (the name of its defining keys in entropy_probe.stage_keys: the rule's,
# unless said otherwise)
STAGES: dict[str, Stage] = {
    "build_policy": Stage(policy.build_policy, "build_policy"),
    "policy_spec": Stage(policy.policy_spec, "policy_spec"),
    "prepare_data": Stage(plan.prepare_data, "prepare_data"),
    "plan": Stage(plan.plan, lambda values: f"plan_{values['kind']}"),
    "rollout": Stage(rollout.rollout, "rollout"),
    "e_stats": Stage(teacher_force.e_stats, "e_stats"),
    "u_objective": Stage(teacher_force.u_objective, "u_objective"),
    "teacher_force_x": Stage(teacher_force.teacher_force_x, "teacher_force_x"),
    "teacher_force_y": Stage(teacher_force.teacher_force_y, "teacher_force_y"),
    "reduce_gradients": Stage(teacher_force.reduce_gradients),
    "update_vector": Stage(update.update_vector, "update_vector"),
    "u_jackknife": Stage(update.u_jackknife, "u_jackknife"),
    "directional": Stage(statistics.directional, "directional"),
    "delta_h1": Stage(statistics.delta_h1, "delta_h1"),
    "snis_shard": Stage(statistics.snis_shard, "snis_shard"),
    "delta_h_snis": Stage(statistics.delta_h_snis, "delta_h_snis"),
    "exact_reference": Stage(statistics.exact_reference, "exact_reference"),
    "fresh_rollout": Stage(fresh.fresh_rollout, "fresh_rollout"),
    "delta_h_sampler": Stage(fresh.delta_h_sampler, "delta_h_sampler"),
    "attribution": Stage(attribution.attribution, "attribution"),
    "variant_u_objective": Stage(variants.variant_u_objective, "variant_u_objective"),
    "variant_teacher_force_y": Stage(teacher_force.teacher_force_y, "variant_teacher_force_y"),
    "variant_reduce_y": Stage(teacher_force.reduce_gradients),
    "variant_update_vector": Stage(variants.variant_update_vector, "variant_update_vector"),
    "variant_directional": Stage(variants.variant_directional, "variant_directional"),
    "variant_snis_shard": Stage(variants.variant_snis_shard, "variant_snis_shard"),
    "step_comparison": Stage(checkpoint.step_comparison, "step_comparison"),
    "summary": Stage(report.summary, "summary"),
    "trajectory": Stage(report.trajectory),
}
