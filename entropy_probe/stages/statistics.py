"""δH₁(η) = η·X·v with its error bars, ΔH(η) with θ's nucleus by SNIS, and the exact reference
where the policy can be enumerated: the E-side passes along v (one job per E shard) and their
reductions over the whole E batch."""
from __future__ import annotations

from typing import Annotated

import logging

import torch

from .. import exact, first_order, gradients, guards, job_cost, models, passes, prompts, shards, snis, snis_pass
from ..entropies import ENTROPY_KINDS
from ..report import update_account
from ..stage import In, Out
from ..sweep import fresh_etas, sweep_etas, with_training_eta
from .inputs import load_for_gradients, load_policy, read_rollouts

log = logging.getLogger(__name__)


def write_directional(cfg: dict, model, tokenizer, fingerprint: str, rollout: dict, v: dict, out: str,
                      where: str) -> None:
    """The directional shard of one E shard: per-prompt-group sums of the X surrogate's derivative
    along v (forward-mode AD; they give δH₁ per group, hence its SE) and the per-token derivatives
    (``token/…``, from which the attribution splits X·v over E tokens)."""
    gen, tf, est = cfg["generation"], cfg["teacher_forcing"], cfg["estimator"]
    tokens = passes.directional_tokens(
        model, v, rollout, pad_token_id=tokenizer.pad_token_id, temperature=gen["temperature"], top_p=gen["top_p"],
        normalization=est["normalization"], baseline=est["baseline"], pathwise_term=est["pathwise_term"],
        tf_batch_size=tf["batch_size"], chunk_tokens=tf["chunk_tokens"], entropy=est["entropy"],
        autocast_dtype=cfg["model"]["precision"],
    )
    sums = passes.sums_of_tokens(tokens, rollout["response_lens"])
    for name, values in sums.items():
        guards.check_sequences(values, f"directional sum {name} (per prompt group)", where)
    per_token = {f"{passes.TOKEN_PREFIX}{name}": values for name, values in tokens.items() if name != "outside_nucleus"}
    cost = job_cost.record(forward=job_cost.sequence_tokens(rollout))  # one forward with a tangent
    shards.write_shard(out, sums | per_token, {"kind": "directional", "model_fingerprint": fingerprint,
                                               "normalization": est["normalization"], "baseline": est["baseline"],
                                               "entropy": est["entropy"], "precision": cfg["model"]["precision"],
                                               "cost": cost})
    log.info("wrote %s: %d prompt groups", out, sums["P"].numel())
    log.info(job_cost.describe(cost))


def write_snis(cfg: dict, model, tokenizer, fingerprint: str, rollout: dict, v: dict, v_meta: dict, out: str,
               where: str) -> None:
    """The SNIS shard of one E shard: per-sequence importance log-weights and entropies at every
    θ' = θ + ηv of the sweep (estimator.eta_list, ±η with central differences, and the η of the
    trainer's step when v records one), θ's nucleus kept."""
    gen, tf = cfg["generation"], cfg["teacher_forcing"]
    etas = sweep_etas(cfg["estimator"], v_meta.get("training_eta"))
    values = snis_pass.snis_pass(model, v, rollout, etas, pad_token_id=tokenizer.pad_token_id,
                                 temperature=gen["temperature"], top_p=gen["top_p"], tf_batch_size=tf["batch_size"],
                                 chunk_tokens=tf["chunk_tokens"], autocast_dtype=cfg["model"]["precision"])
    for name in ("log_w", ENTROPY_KINDS["sampler"].snis_fields[1]):
        guards.check_sequences(values[name].T, f"SNIS {name}", where)
    values["etas"] = torch.tensor(etas, dtype=torch.float64)
    cost = job_cost.record(forward=(1 + len(etas)) * job_cost.sequence_tokens(rollout))  # at θ and each θ + ηv
    shards.write_shard(out, values, {"kind": "snis", "model_fingerprint": fingerprint, "etas": etas,
                                     "precision": cfg["model"]["precision"], "cost": cost})
    log.info("wrote %s: %d sequences x %d etas", out, values["T"].numel(), len(etas))
    log.info(job_cost.describe(cost))


def load_e_pass(cfg: dict, policy: str, rollout: str, v: str, differentiates: bool = True):
    """(model, tokenizer, fingerprint, the E shard, v, v's header) of a pass along v over one E
    shard, the model loaded once for every pass of the job; ``differentiates``: with the
    parameters of model.trainable and model.param_filter selected (the directional pass)."""
    if differentiates:
        model, tokenizer, _, fingerprint = load_for_gradients(cfg, policy)
    else:
        model, tokenizer, fingerprint = load_policy(cfg, policy)
    [read] = read_rollouts([rollout], cfg, "E", fingerprint)
    direction, v_meta = shards.read_shard(v, {"kind": "v", "model_fingerprint": fingerprint})
    return model, tokenizer, fingerprint, read, direction, v_meta


def directional(cfg: dict, *, rollout: Annotated[str, In("an E rollout shard")], policy: Annotated[str, In("the policy directory or spec")],
                v: Annotated[str, In("the update vector")], sums: Annotated[str, Out("results/directional/shard_<shard>.safetensors")]) -> None:
    """Per-prompt-group directional derivatives of the X surrogate along v on one E shard
    (forward-mode AD), and per token (the attribution's E side)."""
    model, tokenizer, fingerprint, read, direction, _ = load_e_pass(cfg, policy, rollout, v)
    write_directional(cfg, model, tokenizer, fingerprint, read, direction, sums, rollout)


def snis_shard(cfg: dict, *, rollout: Annotated[str, In("an E rollout shard")], policy: Annotated[str, In("the policy directory or spec")],
               v: Annotated[str, In("the update vector")], weights: Annotated[str, Out("results/snis/shard_<shard>.safetensors")]) -> None:
    """Per-sequence importance log-weights and shifted entropies of one E shard at every θ + ηv of
    the sweep, θ's nucleus kept: the SNIS estimate of ΔH(η)."""
    model, tokenizer, fingerprint, read, direction, v_meta = load_e_pass(cfg, policy, rollout, v,
                                                                         differentiates=False)
    write_snis(cfg, model, tokenizer, fingerprint, read, direction, v_meta, weights, rollout)


def first_order_of(cfg: dict, X: str, v: str, directional: list[str]) -> dict:
    """δH₁(η) = η·X·v for every η of estimator.eta_list (and the η of the trainer's step when v
    records one), checked against the directional pass, with its E-side SE and per-module split,
    and v's account of the update (optimizer, trainer checkpoint, learning rate)."""
    x_tensors, x_meta = shards.read_shard(X, {"kind": "X"})
    X_grad, _ = gradients.unpack(x_tensors)
    v_tensors, v_meta = shards.read_shard(v, {"kind": "v", "model_fingerprint": x_meta["model_fingerprint"]})
    expect = {"kind": "directional", "model_fingerprint": x_meta["model_fingerprint"],
              "normalization": x_meta["normalization"], "entropy": x_meta.get("entropy", "sampler"),
              "precision": x_meta["precision"]}
    sums = shards.read_set(directional, expect).tensors
    report = first_order.first_order_report(
        X_grad, v_tensors, sums, cfg["batch_config"]["G"], x_meta["normalization"],
        with_training_eta(cfg["estimator"]["eta_list"], v_meta.get("training_eta")), precision=x_meta["precision"],
    )
    report["model_fingerprint"] = x_meta["model_fingerprint"]
    report["update"] = update_account(v_meta)
    report["tokens_outside_recomputed_nucleus"] = {  # bf16 only (entropy_probe.precision.keeps_sampled_tokens)
        "X": x_meta.get("tokens_outside_recomputed_nucleus", 0),
        "directional": int(sum(float(d["outside_nucleus"].sum()) for d in sums if "outside_nucleus" in d))}
    return report


def delta_h1(cfg: dict, *, X: Annotated[str, In("the reduced X")], v: Annotated[str, In("the update vector")],
             directional: Annotated[list[str], In("every directional shard, in E-shard order")],
             report: Annotated[str, Out("results/delta_h1.json")], table: Annotated[str, Out("results/delta_h1.txt")]) -> None:
    """δH₁(η) = η·X·v with its E-side SE and per-module split (:func:`first_order_of`): the JSON and
    a one-screen table."""
    computed = first_order_of(cfg, X, v, directional)
    text = first_order.format_table(computed)
    shards.write_json(report, computed)
    shards.write_text(table, text)
    print(text)


def snis_of(cfg: dict, weights: list[str]) -> dict:
    """ΔH(η) with θ's nucleus held fixed by SNIS over the whole E batch, per η of the shards' sweep:
    SE, ESS and diagnostics, rows with ESS/N below snis.MIN_ESS_FRACTION flagged ``ess_low``."""
    est, G = cfg["estimator"], cfg["batch_config"]["G"]
    read = shards.read_set(weights, {"kind": "snis"}, agree=("etas", "model_fingerprint", "precision"))
    S_field, S_shifted_field = ENTROPY_KINDS[est["entropy"]].snis_fields
    if any(S_field not in t for t in read.tensors):
        raise shards.ShardError(f"no {S_field!r} in an SNIS shard (written before both entropies were stored): rerun "
                                f"it (snakemake --forcerun snis_shard): {weights}")
    etas = read.common["etas"]
    rows = snis.delta_h_sweep(etas, read.cat("log_w", -1), read.cat(S_shifted_field, -1), read.cat(S_field, -1),
                              read.cat("T", -1), read.cat("own_nucleus_differs", -1), G, est["normalization"])
    outside = int(sum(float(t["outside_nucleus"].sum()) for t in read.tensors if "outside_nucleus" in t))
    return {"normalization": est["normalization"], "entropy": est["entropy"],
            "model_fingerprint": read.common["model_fingerprint"], "precision": read.common["precision"],
            "min_ess_fraction": snis.MIN_ESS_FRACTION, "tokens_outside_recomputed_nucleus": outside, "rows": rows}


def delta_h_snis(cfg: dict, *, weights: Annotated[list[str], In("every SNIS shard, in E-shard order")],
                 report: Annotated[str, Out("results/delta_h_snis.json")]) -> None:
    """The true ΔH(η) with θ's nucleus held fixed, by SNIS over the whole E batch (:func:`snis_of`),
    for the per-prefix entropy of estimator.entropy."""
    result = snis_of(cfg, weights)
    for row in result["rows"]:
        log.info("eta %.4g: ΔH = %.6g ± %.3g, ESS %.1f / %d%s", row["eta"], row["delta_h"], row["se"], row["ess"],
                 row["num_sequences"], " (low: SE not to be trusted)" if row["ess_low"] else "")
    shards.write_json(report, result)


def exact_reference(cfg: dict, *, policy: Annotated[str, In("the embedded policy's directory")], v: Annotated[str, In("the update vector")],
                    data_set: Annotated[str, In("the E batch's prompt set, results/data/<E split>.json")],
                    exact_values: Annotated[str, Out("results/estimates/exact.json")]) -> None:
    """The embedded tiny policy only: the exact H, ∇H·v and both ΔH(η) by enumerating every
    response of every prompt of the E prompt set (:func:`entropy_probe.exact.exact_reference`), at
    every η of the SNIS sweep and of estimator.fresh_etas. On the CPU whatever model.device says:
    on a cluster this small job runs on a CPU node."""
    gen, est = cfg["generation"], cfg["estimator"]
    model = models.load_policy(policy, cfg["model"]["dtype"], "cpu")
    tokenizer = models.load_tokenizer(policy)
    direction, v_meta = shards.read_shard(v, {"kind": "v", "model_fingerprint": models.fingerprint(policy)})
    prepared = shards.read_json(data_set)
    texts = [e["prompt"] for e in prompts.load_prepared(prepared["file"], prepared["sha256"])]
    etas = sorted(set(sweep_etas(est, v_meta.get("training_eta"))) | set(fresh_etas(est)))
    result = exact.exact_reference(model, tokenizer, texts, direction, etas, temperature=gen["temperature"],
                                   top_p=gen["top_p"], max_new_tokens=gen["max_new_tokens"],
                                   normalization=est["normalization"], entropy=est["entropy"])
    shards.write_json(exact_values, result)
    log.info("exact H = %.6g, ∇H·v = %.6g over %d prompts", result["H"], result["grad_H_dot_v"], len(texts))
