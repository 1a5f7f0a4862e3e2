"""Where δH₁ comes from: the exact split of X·v over the E tokens (from the directional shards'
per-token derivatives) and over the U tokens (a forward pass over the U shards along J·X, J = ∂v/∂Y
the linearized optimizer step), the U-batch SE of δH₁ and the covariance view. The U pass lives
in this one stage (all U shards): it reruns exactly when the stage does, and one start-up is
cheaper than one per shard."""
from __future__ import annotations

from typing import Annotated

import logging

from .. import attribution as shares, attribution_report, gradients, guards, job_cost, normalization, passes, shards
from ..stage import In, Out
from ..update_builder import UpdateBuilder
from .inputs import load_for_gradients, read_rollouts

log = logging.getLogger(__name__)


def attribution(cfg: dict, *, policy: Annotated[str, In("the policy directory or spec")], X: Annotated[str, In("the reduced X")],
                Y: Annotated[str, In("the reduced Y")], v: Annotated[str, In("the update vector")], u_objective: Annotated[str, In("the U objective")],
                e_rollouts: Annotated[list[str], In("every E rollout shard")], directional: Annotated[list[str], In("every directional shard, in E-shard order")],
                u_rollouts: Annotated[list[str], In("every U rollout shard")],
                e_tokens: Annotated[str, Out("results/attribution/E_tokens.safetensors")],
                u_tokens: Annotated[str, Out("results/attribution/U_tokens.safetensors")],
                summary: Annotated[str, Out("results/attribution/attribution.json")], table: Annotated[str, Out("results/attribution.txt")]) -> None:
    """The token shares of X·v on both batches: one row per token (group, prompt id, response,
    position, token id, share and its parts, entropy or log-prob), the summaries (decoded top
    responses and prompts, the U-batch SE, the covariance view) and the text a person reads."""
    gen, tf, norm = cfg["generation"], cfg["teacher_forcing"], cfg["estimator"]["normalization"]
    model, tokenizer, _, fingerprint = load_for_gradients(cfg, policy)
    X_grad, _ = gradients.unpack(shards.read_shard(X, {"kind": "X", "model_fingerprint": fingerprint})[0])
    Y_grad, _ = gradients.unpack(shards.read_shard(Y, {"kind": "Y", "model_fingerprint": fingerprint})[0])
    direction, v_meta = shards.read_shard(v, {"kind": "v", "model_fingerprint": fingerprint})
    e_read = read_rollouts(e_rollouts, cfg, "E", fingerprint)
    sums = shards.read_set(directional, {"kind": "directional", "model_fingerprint": fingerprint,
                                         "normalization": norm}).tensors
    u_read = read_rollouts(u_rollouts, cfg, "U", fingerprint)
    objective, _ = shards.read_shard(u_objective, {"kind": "u_objective", "model_fingerprint": fingerprint})
    # the U pass: ∂ log p_ik along u = J·X for every U token, shard by shard
    build = UpdateBuilder(cfg, policy, fingerprint, Y)
    u = shares.u_direction(build.jacobian(Y_grad), X_grad)
    u_directional = []
    for path, read in zip(u_rollouts, u_read):
        tokens = passes.u_directional_tokens(model, u, read, pad_token_id=tokenizer.pad_token_id,
                                             temperature=gen["temperature"], tf_batch_size=tf["batch_size"],
                                             chunk_tokens=tf["chunk_tokens"])
        for name, values in tokens.items():
            guards.check_sequences(values, f"U directional {name}", path)
        u_directional.append(tokens)
    log.info("U pass along J·X (|J·X| = %.4g, %s) over %d U shards", gradients.global_norm(u), build.optimizer,
             len(u_read))
    e_table, e_summary = attribution_report.e_attribution(sums, e_read, norm, tokenizer)
    u_table, u_summary = attribution_report.u_attribution(u_directional, u_read, objective,
                                                          gradients.dot(X_grad, direction), v_meta["optimizer"],
                                                          tokenizer, u_objective)
    header = {"model_fingerprint": fingerprint, "normalization": norm}
    shards.write_shard(e_tokens, e_table, header | {"kind": "attribution_E"})
    shards.write_shard(u_tokens, u_table, header | {"kind": "attribution_U", "optimizer": v_meta["optimizer"],
                                                    "clip_coef": build.describe(Y_grad)["clip_coef"]})
    cost = job_cost.record(forward=sum(job_cost.sequence_tokens(read) for read in u_read))  # the U pass along J·X
    shards.write_json(summary, {"E": e_summary, "U": u_summary, "model_fingerprint": fingerprint, "cost": cost})
    log.info(job_cost.describe(cost))
    text = attribution_report.format_attribution(e_summary, u_summary, normalization.get(norm).unit)
    shards.write_text(table, text)
    print(text)
