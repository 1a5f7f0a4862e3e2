"""The covariance view of entropy change, after Cui et al. (2025) (DESIGN §2b "Covariance view").

For a softmax whose logits z are themselves the parameters, H = −Σ_a π_a log π_a has
∂H/∂z_a = −π_a (log π_a + H), so a logit step Δz changes the entropy by
δH = −Cov_{a∼π}(log π(a), Δz(a)) at first order. A natural-gradient step Δz = η A gives
−η Cov(log π, A); a vanilla policy-gradient step Δz = η π⊙A (A centred under π) gives
−η Cov(log π, π·A). Clip-Cov / KL-Cov act on the per-token centred products
(log π_t − mean log π)(A_t − mean A) over a batch's tokens.

For an LLM the logits are not the parameters (shared weights, an optimizer's state, adapters),
so on a real U batch these numbers are diagnostics in other units than nats of ΔH, not
predictions: the probe reports them beside the attribution of X·v to U tokens and measures how
well they rank the tokens that carry δH₁.

Pure tensor functions; per-token values flat ``[R]`` with the prompt group of each token.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def centred_products(x: Tensor, y: Tensor, weights: Tensor | None = None) -> Tensor:
    """(x_t − x̄)(y_t − ȳ) per token, means weighted by ``weights`` (default: uniform), float64."""
    x, y = x.double(), y.double()
    w = torch.ones_like(x) if weights is None else weights.double()
    x_bar, y_bar = (w * x).sum() / w.sum(), (w * y).sum() / w.sum()
    return (x - x_bar) * (y - y_bar)


def covariance(x: Tensor, y: Tensor, groups: Tensor | None = None, weights: Tensor | None = None) -> dict:
    """Cov(x, y) = Σ w x y / Σ w − (Σ w x / Σ w)(Σ w y / Σ w) over tokens, float64, and its
    standard error by the delta method with prompt groups as the units (``groups`` ``[R]`` long:
    each token's group; None or a single group: no SE). ``weights`` default to 1 (a batch's
    token mean); exact expectations pass the probabilities."""
    x, y = x.double(), y.double()
    w = torch.ones_like(x) if weights is None else weights.double()
    n_w, s_x, s_y, s_xy = w.sum(), (w * x).sum(), (w * y).sum(), (w * x * y).sum()
    cov = float(s_xy / n_w - (s_x / n_w) * (s_y / n_w))
    out = {"cov": cov, "se": None, "num_tokens": int(x.numel())}
    if groups is None:
        return out
    groups = groups.long()
    n = int(groups.max()) + 1
    if n < 2:
        return out

    def per_group(v):
        return torch.zeros(n, dtype=torch.float64).index_add(0, groups, v)

    N, Sx, Sy, Sxy = per_group(w), per_group(w * x), per_group(w * y), per_group(w * x * y)
    nb, a, b, c = N.mean(), Sxy.mean(), Sx.mean(), Sy.mean()
    # f = a/n − (b/n)(c/n): ψ_g = ∂f/∂(a, b, c, n) · (group − mean)
    psi = ((Sxy - a) / nb - a * (N - nb) / nb**2 - ((Sx - b) * c + b * (Sy - c)) / nb**2
           + 2 * b * c * (N - nb) / nb**3)
    out["se"] = float(psi.std(correction=1) / math.sqrt(n))
    out["num_groups"] = n
    return out


def top_share(score: Tensor, shares: Tensor, total: float, fraction: float) -> float | None:
    """Σ of ``shares`` over the top ⌈fraction·R⌉ tokens by ``score`` (largest first), over ``total``
    (None when the total is 0)."""
    k = max(1, math.ceil(fraction * score.numel()))
    top = torch.topk(score.double().reshape(-1), min(k, score.numel())).indices
    return float(shares.reshape(-1).double()[top].sum()) / total if total else None


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..R with ties given their average rank."""
    x = x.double().reshape(-1)
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(values.numel(), dtype=torch.float64).index_add(0, inverse, ranks)
    counts = torch.zeros(values.numel(), dtype=torch.float64).index_add(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def spearman(x: Tensor, y: Tensor) -> float | None:
    """Spearman's rank correlation (Pearson correlation of average ranks); None if a side is constant."""
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(torch.sqrt((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum()) / denom if denom > 0 else None


def covariance_view(log_p: Tensor, advantages: Tensor, groups: Tensor, shares: Tensor, total: float,
                    fractions=(0.01, 0.1)) -> dict:
    """The covariance figures of a U batch from its valid tokens (flat ``[R]``): tempered log π_t,
    the advantage of each token's response, its prompt group, and its share of X·v (``total``).
    Cov(log π, A) and Cov(log π, π·A) with SEs, and how the centred products rank the tokens
    carrying δH₁: the share of X·v of the top-product tokens and Spearman's ρ(product, share)."""
    log_p, advantages = log_p.double(), advantages.double()
    products = centred_products(log_p, advantages)
    out = {
        "cov_logp_A": covariance(log_p, advantages, groups),
        "cov_logp_pA": covariance(log_p, log_p.exp() * advantages, groups),
        "spearman_product_vs_share": spearman(products, shares),
    }
    out |= {f"top_{f:g}_product_share_of_X_dot_v": top_share(products, shares, total, f) for f in fractions}
    return out
