"""The stage layer: one function per rule of the workflow (``workflow/rules/<family>.smk`` ↔
``entropy_probe/stages/<family>.py``), each taking the stage's view of the config and the paths
of the files it reads and writes (:mod:`entropy_probe.stage`). Every rule runs
``scripts/run_stage.py``, which looks its stage up here; ``python -m entropy_probe run STAGE``
runs one by hand.

A job imports only its own stage's module: a light stage (a plan, a reduction, the report) starts
without the model libraries the others load."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module

from ..stage import Stage

# rule name -> (module of this package, function, the name of its defining keys in
# entropy_probe.stage_keys: None for a stage that reads no config)
_TABLE = {
    "build_policy": ("policy", "build_policy", "build_policy"),
    "policy_spec": ("policy", "policy_spec", "policy_spec"),
    "prepare_data": ("plan", "prepare_data", "prepare_data"),
    "plan": ("plan", "plan", lambda values: f"plan_{values['kind']}"),
    "rollout": ("rollout", "rollout", "rollout"),
    "e_stats": ("teacher_force", "e_stats", "e_stats"),
    "u_objective": ("teacher_force", "u_objective", "u_objective"),
    "teacher_force_x": ("teacher_force", "teacher_force_x", "teacher_force_x"),
    "teacher_force_y": ("teacher_force", "teacher_force_y", "teacher_force_y"),
    "reduce_gradients": ("teacher_force", "reduce_gradients", None),
    "update_vector": ("update", "update_vector", "update_vector"),
    "u_jackknife": ("update", "u_jackknife", "u_jackknife"),
    "directional": ("statistics", "directional", "directional"),
    "delta_h1": ("statistics", "delta_h1", "delta_h1"),
    "snis_shard": ("statistics", "snis_shard", "snis_shard"),
    "delta_h_snis": ("statistics", "delta_h_snis", "delta_h_snis"),
    "exact_reference": ("statistics", "exact_reference", "exact_reference"),
    "fresh_rollout": ("fresh", "fresh_rollout", "fresh_rollout"),
    "delta_h_sampler": ("fresh", "delta_h_sampler", "delta_h_sampler"),
    "attribution": ("attribution", "attribution", "attribution"),
    "variant_u_objective": ("variants", "variant_u_objective", "variant_u_objective"),
    "variant_teacher_force_y": ("teacher_force", "teacher_force_y", "variant_teacher_force_y"),
    "variant_reduce_y": ("teacher_force", "reduce_gradients", None),
    "variant_update_vector": ("variants", "variant_update_vector", "variant_update_vector"),
    "variant_directional": ("variants", "variant_directional", "variant_directional"),
    "variant_snis_shard": ("variants", "variant_snis_shard", "variant_snis_shard"),
    "step_comparison": ("checkpoint", "step_comparison", "step_comparison"),
    "summary": ("report", "summary", "summary"),
    "trajectory": ("report", "trajectory", None),
}


class _Stages(Mapping):
    """Rule name -> :class:`Stage`, each module imported when its stage is first looked up."""

    def __getitem__(self, rule: str) -> Stage:
        module, function, keys = _TABLE[rule]
        return Stage(getattr(import_module(f"{__name__}.{module}"), function), keys)

    def __iter__(self) -> Iterator[str]:
        return iter(_TABLE)

    def __len__(self) -> int:
        return len(_TABLE)


STAGES: Mapping[str, Stage] = _Stages()
