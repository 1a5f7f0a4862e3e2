"""Stage: where δH₁ comes from. Splits X·v over the E batch's tokens (from the directional
shards' per-token derivatives) and over the U batch's tokens (a forward pass over each U shard
along u = J·X, J = ∂v/∂Y the linearized optimizer step: the clip coefficient for SGD, the AdamW
Jacobian at this Y), with the U-batch standard error and the covariance view:
results/attribution/{E,U}_tokens.safetensors (one row per token: group, prompt id, response,
position, token id, share and its parts, entropy or log-prob), attribution.json (summaries,
decoded top responses and prompts) and attribution.txt.

By hand:  python scripts/attribution.py CONFIG.yaml POLICY X Y V U_OBJECTIVE E_TOKENS_OUT U_TOKENS_OUT JSON_OUT TABLE_OUT
              --e_rollout_paths E_SHARD... --directional_paths DIRECTIONAL_SHARD... --u_rollout_paths U_SHARD...
"""
import logging

from entropy_probe import attribution_report, gradients, guards, normalization, passes, shards, stage_inputs
from entropy_probe.stage import run_stage
from entropy_probe.update_builder import UpdateBuilder

log = logging.getLogger("attribution")


def main(cfg: dict, policy: str, x_path: str, y_path: str, v_path: str, objective_path: str,
         e_rollout_paths: list[str], directional_paths: list[str], u_rollout_paths: list[str],
         e_tokens_path: str, u_tokens_path: str, json_path: str, table_path: str) -> None:
    gen, norm = cfg["generation"], cfg["estimator"]["normalization"]
    model, tokenizer, _, fingerprint = stage_inputs.load_for_teacher_forcing(cfg, policy)
    X, _ = gradients.unpack(shards.read_shard(x_path, {"kind": "X", "model_fingerprint": fingerprint})[0])
    Y, _ = gradients.unpack(shards.read_shard(y_path, {"kind": "Y", "model_fingerprint": fingerprint})[0])
    v, v_meta = shards.read_shard(v_path, {"kind": "v", "model_fingerprint": fingerprint})
    e_rollouts = stage_inputs.read_rollouts(e_rollout_paths, cfg, "E", fingerprint)
    directional = [shards.read_shard(p, {"kind": "directional", "model_fingerprint": fingerprint,
                                         "normalization": norm})[0] for p in directional_paths]
    u_rollouts = stage_inputs.read_rollouts(u_rollout_paths, cfg, "U", fingerprint)
    objective, _ = shards.read_shard(objective_path, {"kind": "u_objective", "model_fingerprint": fingerprint})
    # the U pass: ∂ log p_ik along u = J·X for every U token, shard by shard
    build = UpdateBuilder(cfg, policy, fingerprint, y_path)
    J = build.jacobian(Y)
    u = {name: J[name] * X[name].double() for name in Y}
    u_directional = []
    for path, rollout in zip(u_rollout_paths, u_rollouts):
        tokens = passes.u_directional_tokens(model, u, rollout, pad_token_id=tokenizer.pad_token_id,
                                             temperature=gen["temperature"], tf_batch_size=gen["tf_batch_size"],
                                             chunk_tokens=gen["tf_chunk_tokens"])
        for name, values in tokens.items():
            guards.check_sequences(values, f"U directional {name}", path)
        u_directional.append(tokens)
    log.info("U pass along J·X (|J·X| = %.4g, %s) over %d U shards", gradients.global_norm(u), build.optimizer,
             len(u_rollouts))
    e_table, e_summary = attribution_report.e_attribution(directional, e_rollouts, norm, tokenizer)
    u_table, u_summary = attribution_report.u_attribution(u_directional, u_rollouts, objective, gradients.dot(X, v),
                                                          v_meta["optimizer"], tokenizer, objective_path)
    meta = {"model_fingerprint": fingerprint, "normalization": norm}
    shards.write_shard(e_tokens_path, e_table, meta | {"kind": "attribution_E"})
    shards.write_shard(u_tokens_path, u_table, meta | {"kind": "attribution_U", "optimizer": v_meta["optimizer"],
                                                       "clip_coef": build.describe(Y)["clip_coef"]})
    shards.write_json(json_path, {"E": e_summary, "U": u_summary, "model_fingerprint": fingerprint})
    text = attribution_report.format_attribution(e_summary, u_summary, normalization.get(norm).unit)
    with shards.atomic_path(table_path) as tmp:
        tmp.write_text(text)
    print(text)


run_stage(globals(), main,
          ["policy", "x_path", "y_path", "v_path", "objective_path", "e_tokens_path", "u_tokens_path", "json_path",
           "table_path", *[(f"--{name}", None, {"nargs": "+", "required": True})
                           for name in ("e_rollout_paths", "directional_paths", "u_rollout_paths")]],
          lambda smk: {"policy": smk.input.policy, "x_path": smk.input.X, "y_path": smk.input.Y, "v_path": smk.input.v,
                       "objective_path": smk.input.u_objective, "e_rollout_paths": list(smk.input.e_rollouts),
                       "directional_paths": list(smk.input.directional), "u_rollout_paths": list(smk.input.u_rollouts),
                       "e_tokens_path": smk.output.e_tokens, "u_tokens_path": smk.output.u_tokens,
                       "json_path": smk.output.json, "table_path": smk.output.table}, stage="attribution")
