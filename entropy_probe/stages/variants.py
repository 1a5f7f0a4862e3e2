"""What-if over update rules (update.variants): per variant its own v, its directional pass over
the same E batch along it (X is never recomputed) and, with ``snis: true``, its SNIS pass. Each variant runs the main
stages on its effective config (:func:`entropy_probe.variants.variant_config`); a loss that
differs from the main one gets its own U objective and Y (the teacher_force and reduce_gradients
stages). The variants' δH₁ and ΔH come from the main reductions, run by the report stage."""
from __future__ import annotations

from typing import Annotated

from .. import shards
from ..stage import In, Out
from .statistics import load_e_pass, write_directional, write_snis
from .teacher_force import u_objective_of
from .update import write_update_from_y


def variant_u_objective(cfg: dict, *, policy: Annotated[str, In("the policy directory or spec")],
                        rollouts: Annotated[list[str], In("every U rollout shard")],
                        objective: Annotated[str, Out("results/variants/objectives/<objective>/u_objective.safetensors")]) -> None:
    """The U objective of a variant's loss: as u_objective, but a U batch without signal is the
    variant's answer (v = 0), not a reason to stop."""
    shards.write_shard(objective, *u_objective_of(cfg, policy, rollouts))


def variant_update_vector(cfg: dict, *, policy: Annotated[str, In("the policy directory or spec")],
                          Y: Annotated[str, In("the Y of the variant's objective")],
                          v: Annotated[str, Out("results/variants/<variant>/v.safetensors")]) -> None:
    """A variant's v: its rule's step on its objective's Y (the main Y when the objective is the
    main one), times its lr_factor."""
    write_update_from_y(cfg, policy, Y, v, variant=cfg["variant"]["name"])


def variant_directional(cfg: dict, *, rollout: Annotated[str, In("an E rollout shard")],
                        policy: Annotated[str, In("the policy directory or spec")], v: Annotated[str, In("the variant's v")],
                        sums: Annotated[str, Out("results/variants/<variant>/directional/shard_<shard>.safetensors")]) -> None:
    """A variant's directional sums over one E shard along its v (the E-side SE of its δH₁): the
    file the main directional stage writes."""
    model, tokenizer, fingerprint, read, direction, _ = load_e_pass(cfg, policy, rollout, v)
    write_directional(cfg, model, tokenizer, fingerprint, read, direction, sums, rollout)


def variant_snis_shard(cfg: dict, *, rollout: Annotated[str, In("an E rollout shard")],
                       policy: Annotated[str, In("the policy directory or spec")], v: Annotated[str, In("the variant's v")],
                       weights: Annotated[str, Out("results/variants/<variant>/snis/shard_<shard>.safetensors")]) -> None:
    """A variant's SNIS pass over one E shard at θ + η·v for every η (its ΔH(η); opt-in,
    ``snis: true``): the file the main snis_shard stage writes."""
    model, tokenizer, fingerprint, read, direction, v_meta = load_e_pass(cfg, policy, rollout, v, differentiates=False)
    write_snis(cfg, model, tokenizer, fingerprint, read, direction, v_meta, weights, rollout)
