"""The attribution stage's assembly: per-shard per-token tensors of both batches put together,
split with :mod:`entropy_probe.attribution`, summarised (decoded top responses and prompts, shares
by position and by token entropy, top-token fractions, the covariance view) and formatted as
``results/attribution.txt``. The maths is in :mod:`entropy_probe.attribution` and
:mod:`entropy_probe.covariance`; this module only arranges tensors and text."""
from __future__ import annotations

import torch
from torch import Tensor

from . import attribution, covariance, passes
from . import normalization as norm
from .rollout import rows_in, stored_responses

TOP = 5  # responses / prompts / tokens listed on each side
TEXT_CHARS = 60  # characters of a decoded text in the table (the JSON keeps 400)


def _pad(x: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _cat_rows(parts: list[Tensor]) -> Tensor:
    """Concatenate ``[n_s, T_s]`` blocks along rows, zero-padding every block to the widest."""
    width = max(p.shape[-1] for p in parts)
    return torch.cat([_pad(p, width) for p in parts])


class _Texts:
    """Decoded prompts (by group) and responses (by prompt-major row) of rollout shards, decoded
    when asked for (the report shows a few of them)."""

    def __init__(self, tokenizer, rollouts: list[dict]):
        self.tokenizer = tokenizer
        self.prompt_rows, self.response_rows = [], []
        for r in rollouts:
            B, G, L = r["sequences"].shape
            P = L - r["token_log_q"].shape[-1]
            for b in range(B):
                self.prompt_rows.append((r, b, P))
            self.response_rows += [(r, i, P) for i in range(B * G)]

    def prompt(self, group: int) -> str:
        r, b, P = self.prompt_rows[group]
        ids = r["sequences"][b, 0, :P][r["attention_masks"][b, 0, :P].bool()]
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)

    def response(self, row: int) -> str:
        r, i, P = self.response_rows[row]
        G = r["sequences"].shape[1]
        n = int(r["response_lens"].reshape(-1)[i])
        return self.tokenizer.decode(r["sequences"][i // G, i % G, P:P + n].tolist(), skip_special_tokens=False)


def _clip(text: str, n: int = 400) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _token_table(valid: Tensor, G: int, columns: dict[str, Tensor], prompt_ids: Tensor,
                 response_tokens: Tensor) -> dict[str, Tensor]:
    """Flat per-token table of the valid tokens (row-major): group, prompt id, response, position,
    token id and the given ``[N, T]`` columns."""
    rows, cols = valid.nonzero(as_tuple=True)
    out = {"group": rows // G, "prompt_id": prompt_ids[rows // G], "response": rows % G, "position": cols,
           "token_id": response_tokens[rows, cols]}
    out |= {name: values[rows, cols] for name, values in columns.items()}
    return out


def _top_responses(totals: Tensor, prompt_ids: Tensor, lengths: Tensor, response_tokens: Tensor, texts: _Texts,
                   G: int, extra: dict[str, Tensor], summed_extra: dict | None = None, key: str = "share") -> dict:
    """The responses with the most negative and most positive ``totals`` (reported as ``key``),
    identical (prompt, response) pairs taken together (summed, ``count`` occurrences; ``extra``
    columns from the first occurrence, ``summed_extra`` columns summed too)."""
    keys = torch.cat([prompt_ids.repeat_interleave(G)[:, None], lengths[:, None].long(), response_tokens.long()], 1)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    m = int(inverse.max()) + 1
    summed = torch.zeros(m, dtype=torch.float64).index_add(0, inverse, totals.double())
    count = torch.zeros(m, dtype=torch.long).index_add(0, inverse, torch.ones_like(inverse))
    first = torch.full((m,), inverse.numel(), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(inverse.numel()), reduce="amin")

    sums = {k: torch.zeros(m, dtype=torch.float64).index_add(0, inverse, v.double())
            for k, v in (summed_extra or {}).items()}

    def rows(order):
        return [{key: float(summed[j]), "count": int(count[j]), "prompt": _clip(texts.prompt(int(first[j]) // G)),
                 "response": _clip(texts.response(int(first[j])))} | {k: float(v[first[j]]) for k, v in extra.items()}
                | {k: float(v[j]) for k, v in sums.items()} for j in order]

    return {"most_negative": rows(attribution.ranked(summed, TOP, largest=False)),
            "most_positive": rows(attribution.ranked(summed, TOP, largest=True))}


def e_attribution(directional: list[dict], rollouts: list[dict], normalization: str, tokenizer) -> tuple[dict, dict]:
    """(token table, summary) of the E batch: directional shards (with their per-token tensors)
    and the rollout shards they were computed on, in the same order."""
    G = rollouts[0]["rewards"].shape[1]
    tok = lambda name: _cat_rows([d[passes.TOKEN_PREFIX + name] for d in directional])  # noqa: E731
    lengths = torch.cat([r["response_lens"].reshape(-1) for r in rollouts])
    response_tokens = _cat_rows([stored_responses(r).reshape(-1, r["token_log_q"].shape[-1]) for r in rollouts])
    entropy = tok("entropy")
    shares = attribution.e_token_shares(tok("d_entropy"), tok("d_log_q"), tok("weight_a"), tok("weight_beta"),
                                        entropy, lengths, normalization)
    total = shares["X_dot_v"]
    valid = torch.arange(entropy.shape[-1]) < lengths[:, None]
    prompt_ids = torch.cat([r["prompt_ids"] for r in rollouts])
    table = _token_table(valid, G, {k: shares[k] for k in ("share", "direct", *attribution.E_COMPONENTS)}
                         | {"entropy": entropy, "log_q": tok("log_q")}, prompt_ids, response_tokens)
    P, Q, S, T = (torch.cat([d[k] for d in directional]) for k in ("P", "Q", "S", "T"))
    D = norm.get(normalization).group_denominators(T, G)
    per_prompt = {form: attribution.per_prompt_contributions(P, Q, S, D, prompt_ids, form)
                  for form in ("direct", "influence")}
    ids = per_prompt["direct"]["prompt_ids"]
    texts = _Texts(tokenizer, rollouts)
    n = prompt_ids.numel()
    position = torch.searchsorted(ids, prompt_ids)  # ids are sorted (torch.unique)
    first_group = torch.full((ids.numel(),), n, dtype=torch.long).scatter_reduce(0, position, torch.arange(n),
                                                                                   reduce="amin")
    # a prompt's total: its groups' contributions summed (estimate·count/n), with its SE
    scale = per_prompt["direct"]["count"] / n
    prompt_direct, prompt_se = per_prompt["direct"]["estimate"] * scale, per_prompt["direct"]["se"] * scale
    prompt_share = per_prompt["influence"]["estimate"] * scale

    def prompt_rows(order):
        return [{"prompt_id": int(ids[j]), "prompt": _clip(texts.prompt(int(first_group[j]))),
                 "groups": int(per_prompt["direct"]["count"][j]), "direct": float(prompt_direct[j]),
                 "se": float(prompt_se[j]), "share": float(prompt_share[j])} for j in order]

    rewards = torch.cat([r["rewards"].reshape(-1) for r in rollouts]).double()
    flat = table["direct"]
    token_rows = lambda order: [  # noqa: E731
        {"direct": float(flat[j]), "share": float(table["share"][j]),
         "token": tokenizer.decode([int(table["token_id"][j])], skip_special_tokens=False),
         "position": int(table["position"][j]), "entropy": float(table["entropy"][j]),
         "response": _clip(texts.response(int(table["group"][j]) * G + int(table["response"][j]))),
         "prompt": _clip(texts.prompt(int(table["group"][j])))} for j in order]
    summary = {
        "X_dot_v": total, "H_bar": shares["H_bar"], "normalization": normalization,
        "num_tokens": int(flat.numel()), "num_responses": int(lengths.numel()), "num_groups": n,
        "components": {k: float(shares[k].sum()) for k in attribution.E_COMPONENTS},
        "top_token_fraction": attribution.top_fraction(flat, total),
        "by_position": attribution.by_position(shares["direct"], lengths, total),
        "by_entropy": attribution.by_quantile_bins(table["entropy"], flat, total),
        "responses": _top_responses(shares["direct"].sum(-1), prompt_ids, lengths, response_tokens, texts, G,
                                    {"reward": rewards, "length": lengths.double()},
                                    {"share": shares["share"].sum(-1)}, key="direct"),
        "prompts": {"most_negative": prompt_rows(attribution.ranked(prompt_direct, TOP, largest=False)),
                    "most_positive": prompt_rows(attribution.ranked(prompt_direct, TOP, largest=True))},
        "tokens": {"most_negative": token_rows(attribution.ranked(flat, TOP, largest=False)),
                   "most_positive": token_rows(attribution.ranked(flat, TOP, largest=True))},
    }
    return table, summary


def u_attribution(u_directional: list[dict], rollouts: list[dict], objective: dict, x_dot_v: float, optimizer: str,
                  tokenizer, where: str) -> tuple[dict, dict]:
    """(token table, summary) of the U batch: per-U-shard forward passes along J·X, the rollout
    shards, the whole-batch objective (u_objective: advantages, numerators, normalizer terms) and
    X·v from the reduced X and v."""
    G = rollouts[0]["rewards"].shape[1]
    rows = [rows_in(objective, r, where) for r in rollouts]
    pick = lambda name: torch.cat([objective[name][i].reshape(-1) for i in rows]).double()  # noqa: E731
    a, z, advantages = pick("coefficients"), pick("normalizer_terms"), pick("advantages")
    d_log_p = _cat_rows([d["d_log_p"] for d in u_directional])
    log_p = _cat_rows([d["log_p"] for d in u_directional])
    lengths = torch.cat([r["response_lens"].reshape(-1) for r in rollouts])
    response_tokens = _cat_rows([stored_responses(r).reshape(-1, r["token_log_q"].shape[-1]) for r in rollouts])
    shares = attribution.u_token_shares(d_log_p, a, z, lengths, G)
    total = shares["total"]
    valid = torch.arange(d_log_p.shape[-1]) < lengths[:, None]
    advantage_tokens = advantages[:, None].expand_as(d_log_p)
    prompt_ids = torch.cat([r["prompt_ids"] for r in rollouts])
    products = torch.zeros_like(d_log_p)
    products[valid] = covariance.centred_products(log_p[valid], advantage_tokens[valid])
    table = _token_table(valid, G, {"share": shares["share"], "normalizer_term": shares["normalizer_term"],
                                    "log_p": log_p, "advantage": advantage_tokens, "cov_product": products},
                         prompt_ids, response_tokens)
    cov = covariance.covariance_view(table["log_p"], table["advantage"], table["group"], table["share"], total)
    texts = _Texts(tokenizer, rollouts)
    rewards = torch.cat([r["rewards"].reshape(-1) for r in rollouts]).double()
    # per U shard: Σ a_i ∂_u log p_i and Σ z_i (the linear map's leave-one-shard-out predictions)
    bounds = torch.tensor([0] + [r["response_lens"].numel() for r in rollouts]).cumsum(0).tolist()
    shard_sums = [(float((a[lo:hi, None] * d_log_p[lo:hi]).sum()), float(z[lo:hi].sum()))
                  for lo, hi in zip(bounds, bounds[1:])]
    summary = {
        "optimizer": optimizer, "X_dot_v": x_dot_v, "X_dot_JY": total, "intercept": x_dot_v - total,
        "se_u": shares["se"], "degrees_of_freedom": int(shares["group_influence"].numel()) - 1,
        "num_tokens": int(table["share"].numel()), "num_responses": int(lengths.numel()),
        "top_token_fraction": attribution.top_fraction(table["share"], total),
        "responses": _top_responses(shares["share"].sum(-1), prompt_ids, lengths, response_tokens, texts, G,
                                    {"advantage": advantages, "reward": rewards, "cov_product": products.sum(-1)}),
        "covariance": cov, "shard_sums": shard_sums,
    }
    return table, summary


def _text(s: str) -> str:
    s = s.replace("\n", "⏎")
    return repr(s if len(s) <= TEXT_CHARS else s[: TEXT_CHARS - 1] + "…")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _tops(fractions: dict) -> str:
    return ", ".join(f"the top {100 * float(k.split('_')[1]):g}% of tokens {_pct(v)}" for k, v in fractions.items())


def format_attribution(e: dict, u: dict, unit: str) -> str:
    """``results/attribution.txt``: where X·v (δH₁ per unit η) comes from, E side and U side, and the
    covariance view beside it."""
    lines = [f"Where δH₁ = η·X·v comes from ({unit} per unit η). Shares are exact: they sum to X·v.", "",
             f"E batch: X·v = {e['X_dot_v']:.5g} over {e['num_tokens']} tokens of {e['num_responses']} responses "
             f"({e['num_groups']} prompt groups). A token's direct term: its pathwise ∂_v h_k plus its score "
             "w_k ∂_v log q_k, over ΣD (H̄, T̄ held fixed); its share adds its pull on the plug-ins H̄ and T̄ "
             "(influence form: a group's shares are its unit of the SE; they sum to 0 over the batch). Lists "
             "and fractions below use the direct terms.",
             "  sums: " + ", ".join(f"{k} {v:.4g}" for k, v in e["components"].items()),
             f"  carried by {_tops(e['top_token_fraction'])} of X·v (tokens ranked by their direct terms in X·v's direction)",
             "  by position:     " + "  ".join(f"k={r['position']}: {_pct(r['fraction'])}" for r in e["by_position"]),
             "  by entropy h_k:  " + "  ".join(f"[{r['low']:.3g}, {r['high']:.3g}]: {_pct(r['fraction'])}"
                                               for r in e["by_entropy"])]
    for side, label in (("most_negative", "lowering the entropy most"), ("most_positive", "raising it most")):
        lines += ["", f"  E responses {label} (identical ones together, ×count):",
                  f"  {'direct':>11} {'share':>11} {'×':>4} {'reward':>6}  prompt -> response"]
        lines += [f"  {r['direct']:>11.4g} {r['share']:>11.4g} {r['count']:>4} {r['reward']:>6.3g}  "
                  f"{_text(r['prompt'])} -> {_text(r['response'])}" for r in e["responses"][side]]
    for side, label in (("most_negative", "lowering"), ("most_positive", "raising")):
        lines += ["", f"  E prompts {label} the entropy most (all their groups):",
                  f"  {'direct':>11} {'± SE':>9} {'share':>11} {'groups':>6}  prompt"]
        lines += [f"  {r['direct']:>11.4g} {r['se']:>9.2g} {r['share']:>11.4g} {r['groups']:>6}  {_text(r['prompt'])}"
                  for r in e["prompts"][side]]
    lines += ["", "  E tokens with the largest direct terms:",
              f"  {'direct':>11} {'h_k':>7} {'k':>3}  token  in  prompt -> response"]
    for side in ("most_negative", "most_positive"):
        lines += [f"  {r['direct']:>11.4g} {r['entropy']:>7.3g} {r['position']:>3}  {_text(r['token'])}  in  "
                  f"{_text(r['prompt'])} -> {_text(r['response'])}" for r in e["tokens"][side][:3]]
    linear = "X·v" if u["optimizer"] == "sgd" else "X·J·Y (AdamW linearized at this Y: J = ∂v/∂Y)"
    lines += ["", f"U batch ({u['optimizer']}): X·v = {u['X_dot_v']:.5g}; the U tokens' terms of Y sum to {linear} = "
              f"{u['X_dot_JY']:.5g}" + ("" if u["optimizer"] == "sgd" else
                                        f" (intercept X·v − X·J·Y = {u['intercept']:.4g}: momentum, weight decay)")
              + f". U-batch SE of X·v: {_num(u['se_u'], '.3g')} (influence over prompt groups, "
              f"{u['degrees_of_freedom']} dof).",
              f"  carried by {_tops(u['top_token_fraction'])} of {linear.split(' ')[0]}"]
    for side, label in (("most_negative", "pushing the entropy down most"), ("most_positive", "pushing it up most")):
        lines += ["", f"  U responses {label} (share: c_i Σ_k ∂_u log p_ik; cov: Σ_k centred log π·A products):",
                  f"  {'share':>11} {'×':>4} {'cov':>9} {'A':>7} {'reward':>6}  prompt -> response"]
        lines += [f"  {r['share']:>11.4g} {r['count']:>4} {r['cov_product']:>9.3g} {r['advantage']:>7.3g} "
                  f"{r['reward']:>6.3g}  {_text(r['prompt'])} -> {_text(r['response'])}" for r in u["responses"][side]]
    c = u["covariance"]
    fmt_cov = lambda d: f"{d['cov']:.4g} ± {d['se']:.2g}" if d["se"] is not None else f"{d['cov']:.4g}"  # noqa: E731
    lines += ["", "Covariance view (Cui et al. 2025) on the U batch's tokens — a proxy that assumes the logits are "
              "the parameters (no optimizer state, no shared weights); other units than ΔH, not a prediction:",
              f"  Cov(log π, A)   = {fmt_cov(c['cov_logp_A'])}   (natural-gradient step on the logits: δH = −η·Cov)",
              f"  Cov(log π, π·A) = {fmt_cov(c['cov_logp_pA'])}   (vanilla step on the logits: δH = −η·Cov)",
              f"  the top 1% of U tokens by centred product carry {_pct(c['top_0.01_product_share_of_X_dot_v'])} "
              f"of {linear.split(' ')[0]} (top 10%: {_pct(c['top_0.1_product_share_of_X_dot_v'])}); Spearman ρ(product, "
              f"share) = {_num(c['spearman_product_vs_share'], '.3f')}"]
    return "\n".join(lines) + "\n"
