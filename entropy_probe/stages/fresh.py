"""The sampler's own entropy change ΔH_sampler(η) (DESIGN §2b): every E response slot redrawn at
θ + ηv with the same sampling noise, under θ + ηv's own sampler, one job per (η, E shard); then
the paired reduction over the whole E batch."""
from __future__ import annotations

from typing import Annotated

import logging

import torch

from .. import entropies, fresh, fresh_pass, guards, job_cost, noise, shards, snis
from ..plan import shard_slots
from ..stage import Arg, In, Out
from .inputs import load_policy, read_rollouts, rollout_header

log = logging.getLogger(__name__)


def fresh_rollout(cfg: dict, *, rollout: Annotated[str, In("an E rollout shard")], plan: Annotated[str, In("the E plan, results/plan/E.json")],
                  policy: Annotated[str, In("the policy directory or spec")], v: Annotated[str, In("the update vector")],
                  eta: Annotated[float, Arg("the step size η")], shard: Annotated[int, Arg("the E shard's index")],
                  redrawn: Annotated[str, Out("results/fresh/eta_<eta>/shard_<shard>.safetensors")]) -> None:
    """One E shard redrawn at θ' = θ + ηv with the same sampling noise, under θ''s own sampler: the
    responses, both per-prefix entropies at sampling time, which responses changed, and the
    shard's per-response sums at θ for the paired reduction."""
    gen, batch, tf = cfg["generation"], cfg["batch_config"], cfg["teacher_forcing"]
    model, tokenizer, fingerprint = load_policy(cfg, policy)
    [read] = read_rollouts([rollout], cfg, "E", fingerprint)
    e_plan = shards.read_json(plan)
    if e_plan.get("kind") != "E" or list(e_plan["shards"][shard]) != read["prompt_ids"].tolist():
        raise shards.ShardError(f"{rollout}: its prompts are not shard {shard} of the E plan {plan}")
    direction, _ = shards.read_shard(v, {"kind": "v", "model_fingerprint": fingerprint})
    out, counts = fresh_pass.fresh_rollout_shard(
        model, tokenizer, read, direction, eta, slots=shard_slots(e_plan, shard), seed=batch["seed"],
        temperature=gen["temperature"], top_p=gen["top_p"], max_new_tokens=gen["max_new_tokens"],
        gen_batch_size=gen["gen_batch_size"], stop_strings=gen["stop_strings"],
        autocast_dtype=cfg["model"]["precision"], kv_cache=gen["kv_cache"], method=gen["fresh_rollouts"],
        tf_batch_size=tf["batch_size"], chunk_tokens=tf["chunk_tokens"],
    )
    cost = job_cost.record(generated=counts["generated_tokens"], forward=counts["forward_tokens"],
                           method=gen["fresh_rollouts"], teacher_forced_tokens=counts["teacher_forced_tokens"],
                           regeneration_tokens=counts["regeneration_tokens"])
    B, G, T = out["rb_entropies"].shape
    for name in ("token_log_q", "rb_entropies", "tempered_entropies"):
        guards.check_sequences(out[name].reshape(B * G, T), f"fresh-rollout {name}", rollout)
    header = rollout_header(cfg, "E", fingerprint) | {
        "kind": "fresh", "eta": eta, "shard_index": shard, "num_shards": len(e_plan["shards"]),
        "noise": {"sampler": "gumbel-max", "generator": noise.GENERATOR, "stream": noise.STREAM_E},
        "cost": cost,
    }
    shards.write_shard(redrawn, out, header)
    changed = out["changed"]
    log.info("wrote %s: η = %g, %d of %d responses changed (%d of %d prompt groups); mean RB entropy %.5f -> %.5f",
             redrawn, eta, int(changed.sum()), changed.numel(), int(changed.any(-1).sum()), B,
             float(out["base_S"].sum() / out["base_T"].sum()),
             float(out["rb_entropies"].double().sum() / out["response_lens"].sum()))
    log.info("cost (%s): %d tokens teacher-forced, %d generated one by one (regenerating every response: %d), "
             "%.1f s", cost["method"], cost["teacher_forced_tokens"], cost["generated_tokens"],
             cost["regeneration_tokens"], cost["seconds"])


def delta_h_sampler(cfg: dict, *, redrawn: Annotated[list[str], In("every fresh-rollout shard (every η, every E shard)")],
                    report: Annotated[str, Out("results/delta_h_sampler.json")],
                    weights: Annotated[list[str], In("every SNIS shard, in E-shard order (the decomposition)")] = ()
                    ) -> None:
    """The sampler's own entropy change ΔH_sampler(η) = H(θ + ηv) − H̄(θ) from the coupled fresh
    rollouts of every E shard, with its paired SE, how many responses changed and what the
    coupling saved against independent draws, per η of estimator.fresh_etas; where the SNIS
    sweep has the η, its decomposition into the change with θ's nucleus held fixed and the
    boundary part, each with its SE (:func:`entropy_probe.fresh.decompose`)."""
    est, G = cfg["estimator"], cfg["batch_config"]["G"]
    frozen = _frozen_terms(cfg, weights) if weights else {}
    read = shards.read_set(redrawn, {"kind": "fresh"}, agree=("model_fingerprint", "num_shards"))
    by_eta: dict[float, list[int]] = {}
    for i, meta in enumerate(read.metas):
        by_eta.setdefault(float(meta["eta"]), []).append(i)
    wanted = sorted(float(e) for e in est["fresh_etas"])
    if sorted(by_eta) != wanted:
        raise shards.ShardError(f"fresh-rollout shards hold η {sorted(by_eta)}, expected {wanted}: {redrawn}")
    rows = []
    for eta in sorted(by_eta):
        of_eta = read.subset(by_eta[eta]).complete()
        parts = [fresh.per_response(t, est["entropy"]) for t in of_eta.tensors]
        whole = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        row = {"eta": eta, **fresh.delta_h_sampler(**whole, G=G, normalization=est["normalization"]),
               "cost": _total_cost([meta.get("cost") for meta in of_eta.metas])}
        if eta in frozen:
            T, delta, psi, events = frozen[eta]
            row["nucleus_events"] = events
            row["events_low"] = fresh.events_low(events, of_eta.metas[0]["generation"]["top_p"])  # as drawn
            if not torch.equal(T, whole["T_base"]):
                raise shards.ShardError(f"the SNIS shards {weights} do not hold the E batch of the fresh rollouts "
                                        f"{redrawn} (other response lengths): rerun both")
            _, _, psi_sampler = fresh.sampler_terms(whole["S_new"], whole["T_new"], whole["S_base"], whole["T_base"],
                                                    G, est["normalization"])
            row["decomposition"] = fresh.decompose((row["delta_h"], psi_sampler), (delta, psi))
            log.info("eta %.4g: ΔH_sampler = ΔH with θ's nucleus %.6g ± %.3g + boundary part %.6g ± %.3g", eta,
                     row["decomposition"]["frozen"], row["decomposition"]["frozen_se"],
                     row["decomposition"]["boundary"], row["decomposition"]["boundary_se"])
        log.info("eta %.4g: ΔH_sampler = %.6g ± %.3g; %d of %d responses changed; coupling: SE %.3gx smaller than "
                 "with independent noise", eta, row["delta_h"], row["se"], row["changed_responses"],
                 row["num_sequences"], row["coupling_se_factor"] or float("nan"))
        rows.append(row)
    shards.write_json(report, {"normalization": est["normalization"], "entropy": est["entropy"],
                               "model_fingerprint": read.common["model_fingerprint"], "rows": rows})


def _frozen_terms(cfg: dict, weights: list[str]) -> dict[float, tuple]:
    """η -> (T ``[N]``, ΔH with θ's nucleus held fixed, its ψ ``[n]``, the nucleus events: E sequences
    along which θ + ηv's own nucleus differs from θ's) from the SNIS shards, per η of their sweep
    (ΔH: the same function of them as results/delta_h_snis.json)."""
    est, G = cfg["estimator"], cfg["batch_config"]["G"]
    read = shards.read_set(weights, {"kind": "snis"}, agree=("etas", "model_fingerprint"))
    S_field, S_shifted_field = entropies.get(est["entropy"]).snis_fields
    log_w, S_shifted, S, T = (read.cat(name, -1) for name in ("log_w", S_shifted_field, S_field, "T"))
    differs = read.cat("own_nucleus_differs", -1)
    out = {}
    for j, eta in enumerate(read.common["etas"]):
        H_shifted, H_base, psi = snis.ratio_terms(log_w[j], S_shifted[j], S, T, G, est["normalization"])
        out[float(eta)] = (T.double(), H_shifted - H_base, psi, int(differs[j].sum()))
    return out


def _total_cost(costs: list[dict | None]) -> dict | None:
    """The fresh-rollout cost of one η over its E shards: the token counts and seconds summed
    (None when a shard written before costs were recorded holds none)."""
    if any(c is None for c in costs):
        return None
    methods = sorted({c["method"] for c in costs})
    total = {"method": methods[0] if len(methods) == 1 else methods}
    for name in ("teacher_forced_tokens", "regeneration_tokens", *job_cost.COUNTS, "seconds"):
        if any(name not in c for c in costs):  # a shard of an older version: its count unknown
            total[name] = None
            continue
        total[name] = sum(c[name] for c in costs)
    total["seconds"] = round(total["seconds"], 3)
    return total
