"""Where δH₁ = η·X·v comes from (DESIGN §2b "Attribution"): exact additive splits of X·v over the
E batch's tokens and over the U batch's tokens, and summaries of them.

E side. With per-token forward-mode derivatives along v (``passes.directional_tokens``), and
D_i = T_i (``token``) or 1 (``sequence``), D = Σ_i D_i, N responses, n = N/G prompt groups,
H̄ = Σ h / D, P = Σ [∂_v h_k + a_k ∂_v log q_k], Q = Σ β_k ∂_v log q_k and the estimate
X·v = (P − H̄ Q)/D (:func:`estimators.xu_estimate`), token k of response i gets

    share_k = [ ∂_v h_k + (a_k − H̄ β_k) ∂_v log q_k                     (direct: pathwise + score w_k ∂_v log q_k)
                − (Q/D)(h_k − H̄ D_i/T_i)                                 (plug-in: its pull on H̄)
                + X·v (D/N − D_i)/T_i ] / D                              (plug-in: its pull on T̄)

Derivation: the influence contribution of group g (:func:`estimators.xu_influence`) is
φ_g = X·v + ψ_g = [P_g − H̄ Q_g − (Q̄/D̄)(S_g − H̄ D_g) − X·v D_g]/D̄ + X·v (bars: means over
groups, D̄ = D/n). Write φ_g/n as a sum over the group's tokens: P_g − H̄ Q_g is a sum of
per-token terms; S_g − H̄ D_g = Σ_{k∈g} (h_k − H̄ D_i/T_i) (the token's pull on H̄); and
X·v (1/n − D_g/D) = Σ_{i∈g} X·v (D/N − D_i)/D (the response's length against the mean, which
moves T̄), spread evenly over its T_i tokens. Hence: token shares sum to each response's total,
response totals to φ_g/n, and the φ_g/n over the batch to X·v exactly (Σ_k (h_k − H̄ D_i/T_i) = 0
and Σ_i (D/N − D_i) = 0). With ``sequence``, β = 0 and D_i = 1: the plug-in terms vanish and
share_k = [∂_v h_k + a_k ∂_v log q_k]/N.

Two readings, both exact sums to X·v: the ``direct`` part alone (H̄ and T̄ held fixed) is the
token's own term of the X surrogate; a prompt's direct terms estimate its exact term
c_x = (∂_v E[S|x] − H ∂_v E[D|x])/E[D] of ∇H·v = mean_x c_x. The ``share`` (direct + plug-in)
is the influence form: a prompt's shares estimate c_x plus how the prompt moves H and E[D]
(:func:`exact.exact_prompt_contributions`), and a group's shares are its unit of the SE. A
prompt whose responses never change (c_x = 0) has no direct part but a plug-in part: it dilutes.

U side. Y = Σ_i c_i Σ_k ∇ log p_ik with c_i = a_i / Z (:mod:`entropy_probe.losses`). For SGD
v = κ·Y (κ the clip coefficient), so X·v = Σ_ik κ c_i ∂_X log p_ik exactly. For AdamW, v is a
non-linear function of Y; its linearization at this batch's Y, v ≈ v(Y) + J (Y' − Y) with
J = ∂v/∂Y (diagonal, κ held fixed: :func:`update.update_jacobian`), makes X·J·Y = Σ_ik c_i
∂_u log p_ik with u = J X additive over U tokens; X·v − X·J·Y is the part of the step that this
batch's gradient does not set at first order (momentum, weight decay, Adam's normalization). The
per-group influence contributions of R = X·J·Y = Σ_g A_g / Σ_g Z_g (A_g = Σ_{i∈g} a_i ∂_u log p_i,
Z_g the group's normalizer terms) give the U-batch noise of δH₁ (B_U − 1 degrees of freedom); their
token form adds each token's normalizer term −R z_i/(T_i Z) + R/(N T_i) to its term of Y (zero
when z_i is constant, e.g. ``seq_mean_token_mean``; not zero for ``token_mean``).

Shapes: N responses (prompt-major rows b·G + g), T positions; per-token tensors ``[N, T]``, zero
past each response's end; lengths ``[N]``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import estimators, normalization as norm

E_COMPONENTS = ("pathwise", "score", "plugin")  # share = direct + plugin, direct = pathwise + score


def _valid(lengths: Tensor, width: int) -> Tensor:
    return torch.arange(width) < lengths[:, None]


def u_direction(J: dict[str, Tensor], X: dict[str, Tensor]) -> dict[str, Tensor]:
    """u = J·X (J = ∂v/∂Y diagonal, keyed like Y): the direction along which each U token's term
    of Y gives its share of X·J·Y (module docstring), float64."""
    return {name: J[name] * X[name].double() for name in J}


def e_token_shares(d_entropy: Tensor, d_log_q: Tensor, weight_a: Tensor, weight_beta: Tensor, entropy: Tensor,
                   lengths: Tensor, normalization: str) -> dict:
    """Each E token's share of X·v (module docstring), float64 ``[N, T]``: ``share`` (influence
    form), ``direct`` and the parts ``pathwise``, ``score``, ``plugin``; ``X_dot_v`` (= Σ share =
    Σ direct), ``H_bar``."""
    d_entropy, d_log_q, a, beta, h = (x.double() for x in (d_entropy, d_log_q, weight_a, weight_beta, entropy))
    lengths = lengths.long()
    valid = _valid(lengths, h.shape[-1])
    nz = lambda x: torch.where(valid, x, 0.0)  # noqa: E731
    d_entropy, d_log_q, a, beta, h = map(nz, (d_entropy, d_log_q, a, beta, h))
    D_i = norm.get(normalization).denominators(lengths)
    D = float(D_i.sum())
    N = lengths.numel()
    H_bar = norm.plugin_entropy(h.sum(-1), lengths, normalization)
    P = float((d_entropy + a * d_log_q).sum())
    Q = float((beta * d_log_q).sum())
    estimate = (P - H_bar * Q) / D
    T_i = lengths.double()[:, None]
    pathwise = d_entropy / D
    score = (a - H_bar * beta) * d_log_q / D
    plugin = nz(-(Q / D) * (h - H_bar * D_i[:, None] / T_i) + estimate * (D / N - D_i[:, None]) / T_i) / D
    direct = pathwise + score
    return {"share": direct + plugin, "direct": direct, "pathwise": pathwise, "score": score, "plugin": plugin,
            "X_dot_v": estimate, "H_bar": H_bar}


def _group_contribution(local: Tensor, overall: Tensor) -> Tensor:
    """φ = ψ + X·v of local means (P, Q, S, D) given the batch means ``overall`` (P̄, Q̄, S̄, D̄):
    a group's influence contribution (:func:`estimators.xu_influence`) plus the estimate, or the
    mean of a prompt's groups."""
    return estimators.xu_influence(local, overall) + estimators.xu_estimate(overall)


def _direct_contribution(local: Tensor, overall: Tensor) -> Tensor:
    """(P − H̄Q)/D̄: the direct terms of a group (or the mean of a prompt's groups)."""
    P, Q, _, _ = local
    _, _, Sb, Db = overall
    return (P - Sb / Db * Q) / Db


FORMS = {"influence": _group_contribution, "direct": _direct_contribution}


def per_prompt_contributions(P: Tensor, Q: Tensor, S: Tensor, D: Tensor, prompt_ids: Tensor,
                             form: str = "influence") -> dict[str, Tensor]:
    """Per prompt id of the E batch (prompts drawn with replacement): the mean contribution of its
    groups in ``form`` ``influence`` (φ_g, the shares) or ``direct`` (the direct parts), in X·v
    units (weighted by the counts they average to X·v; their expectations are the prompt's exact
    ``influence_form`` / ``term`` of :func:`exact.exact_prompt_contributions`), its standard error
    and the group count. Group sums ``[n]`` as in :func:`estimators.directional_contributions`
    (D_g = Σ_{i∈g} D_i).

    SE by the delta method over all n groups: a prompt's estimate depends on its own groups and
    on the whole-batch plug-ins (H̄, Q̄/D̄, D̄, X·v), whose noise counts too (a prompt whose
    responses are all alike still has an SE). Returns ``prompt_ids``, ``estimate``, ``se``,
    ``count`` (``[m]`` each, m distinct prompts)."""
    values = torch.stack([P, Q, S, D], dim=-1).double()  # [n, 4]
    n = values.shape[0]
    ids, inverse = torch.unique(prompt_ids, return_inverse=True)
    m = ids.numel()
    count = torch.zeros(m, dtype=torch.float64).index_add(0, inverse, torch.ones(n, dtype=torch.float64))
    local = torch.zeros(m, 4, dtype=torch.float64).index_add(0, inverse, values) / count[:, None]
    overall = values.mean(0)
    f = FORMS[form]
    estimate = torch.func.vmap(f, in_dims=(0, None))(local, overall)
    g_local, g_overall = torch.func.vmap(torch.func.grad(f, argnums=(0, 1)), in_dims=(0, None))(local, overall)
    # influence of group h on prompt x's estimate: own_xh (h a group of x) + glob_xh (through the batch
    # means); both have mean 0 over h, so SE² = Σ_h (own + glob)² / ((n − 1) n), in O(n) memory:
    # Σ_h glob² = g_Γᵀ C g_Γ with C = Σ_h (V_h − Γ)(V_h − Γ)ᵀ; the own terms live on x's groups only.
    centred = values - overall
    glob_squared = torch.einsum("xi,ij,xj->x", g_overall, centred.T @ centred, g_overall)
    own = (n / count[inverse]) * ((values - local[inverse]) * g_local[inverse]).sum(-1)
    glob = (centred * g_overall[inverse]).sum(-1)
    cross = torch.zeros(m, dtype=torch.float64).index_add(0, inverse, own * own + 2 * own * glob)
    se = (torch.sqrt((glob_squared + cross).clamp(min=0) / (n - 1)) / math.sqrt(n) if n >= 2
          else torch.full((m,), float("nan"), dtype=torch.float64))
    return {"prompt_ids": ids, "estimate": estimate, "se": se, "count": count}


def u_token_shares(d_log_p: Tensor, numerators: Tensor, normalizer_terms: Tensor, lengths: Tensor, G: int) -> dict:
    """Each U token's term of X·J·Y (module docstring) and the U-batch noise, float64.

    ``d_log_p`` ``[N, T]``: ∂_u log p_ik along u = J X; ``numerators`` a_i and ``normalizer_terms``
    z_i ``[N]`` (:func:`losses.response_weights`, c_i = a_i / Σ z). Returns ``share`` ``[N, T]``
    (c_i ∂_u log p_ik), ``normalizer_term`` ``[N, T]`` (share + normalizer_term sums per group to
    its influence contribution), ``total`` (= Σ share = X·J·Y), ``group_influence`` ``[n]`` (ψ_g,
    sum 0) and ``se`` = sd(ψ)/√n."""
    d_log_p = torch.where(_valid(lengths.long(), d_log_p.shape[-1]), d_log_p.double(), 0.0)
    a, z = numerators.double().reshape(-1), normalizer_terms.double().reshape(-1)
    Z = float(z.sum())
    share = a[:, None] * d_log_p / Z
    total, influence = norm.ratio_influence(norm.group_sums(a * d_log_p.sum(-1), G), norm.group_sums(z, G))
    N, T_i = a.numel(), lengths.double()
    per_response = -total * z / Z + total / N  # Σ over groups: −R + R = 0
    normalizer_term = torch.where(_valid(lengths.long(), d_log_p.shape[-1]), (per_response / T_i)[:, None], 0.0)
    return {"share": share, "normalizer_term": normalizer_term, "total": total, "group_influence": influence,
            "se": norm.standard_error(influence) if influence.numel() >= 2 else None}


def linearization_check(x_dot_v: float, linear_total: float, shard_sums: list[tuple[float, float]],
                        leave_one_out: list[float]) -> dict:
    """The U-side linear map against the exact leave-one-U-shard-out X·v (the jackknife's values):
    the linear prediction of X·v without shard s is X·v + (A − A_s)/(Z − Z_s) − A/Z, with (A_s, Z_s)
    the shard's sums of a_i ∂_u log p_i and z_i. Returns the predictions and the largest error
    relative to the exact change (0 for SGD up to rounding: SGD is linear in Y)."""
    A, Z = sum(s for s, _ in shard_sums), sum(z for _, z in shard_sums)
    predicted = [x_dot_v + (A - a_s) / (Z - z_s) - linear_total for a_s, z_s in shard_sums]
    changes = [abs(exact - x_dot_v) for exact in leave_one_out]
    errors = [abs(p - e) for p, e in zip(predicted, leave_one_out)]
    scale = max(changes) if changes and max(changes) > 0 else 1.0
    return {"predicted_leave_one_shard_out": predicted, "exact_leave_one_shard_out": list(leave_one_out),
            "max_error_relative_to_change": max(errors) / scale if errors else 0.0}


# ------------------------------------------------------------------------------------ summaries

def top_fraction(shares: Tensor, total: float, fractions=(0.01, 0.1)) -> dict[str, float | None]:
    """Share of ``total`` carried by the top ⌈f·R⌉ of R tokens, ranked by their share in the
    direction of the total (largest sign(total)·share first). Can exceed 1 (the rest cancels);
    None when the total is 0."""
    flat = shares.reshape(-1).double()
    sign = 1.0 if total >= 0 else -1.0
    ordered = torch.sort(sign * flat, descending=True).values * sign
    out = {}
    for f in fractions:
        k = max(1, math.ceil(f * flat.numel()))
        out[f"top_{f:g}"] = float(ordered[:k].sum()) / total if total else None
    return out


def by_position(shares: Tensor, lengths: Tensor, total: float) -> list[dict]:
    """Per response position k: token count, Σ share, its fraction of ``total``."""
    valid = _valid(lengths.long(), shares.shape[-1])
    rows = []
    for k in range(shares.shape[-1]):
        count = int(valid[:, k].sum())
        if count:
            s = float(shares[:, k][valid[:, k]].sum())
            rows.append({"position": k, "tokens": count, "share": s, "fraction": s / total if total else None})
    return rows


def by_quantile_bins(values: Tensor, shares: Tensor, total: float, bins: int = 5) -> list[dict]:
    """Tokens binned by ``values`` (flat ``[R]``, e.g. their entropy h_k) at its quantiles (bins
    merged where quantiles tie): range, token count, Σ share, fraction of ``total``."""
    values, shares = values.reshape(-1).double(), shares.reshape(-1).double()
    edges = torch.quantile(values, torch.linspace(0, 1, bins + 1, dtype=torch.float64))
    edges = torch.unique(edges)
    rows = []
    for i in range(max(1, len(edges) - 1)):
        lo, hi = float(edges[i]), float(edges[min(i + 1, len(edges) - 1)])
        last = i == len(edges) - 2 or len(edges) == 1
        inside = (values >= lo) & ((values <= hi) if last else (values < hi))
        s = float(shares[inside].sum())
        rows.append({"low": lo, "high": hi, "tokens": int(inside.sum()), "share": s,
                     "fraction": s / total if total else None})
    return rows


def ranked(values: Tensor, count: int, largest: bool) -> list[int]:
    """Indices of the ``count`` largest (or smallest) entries of a flat tensor."""
    count = min(count, values.numel())
    return torch.topk(values.double(), count, largest=largest).indices.tolist()
