"""δH₁(η) = η·X·v (DESIGN §2), its per-module split, its E-side standard error and the
delete-one-U-shard jackknife of the U-batch noise in v."""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from . import estimators, gradients, normalization as norm, precision as precisions

log = logging.getLogger(__name__)

SE_SCOPE = "E-batch sampling noise only (v held fixed; U-batch noise in v not included)"


def delta_h1(eta: float, x_dot_v: float, x_dot_v_se: float | None = None) -> dict:
    """δH₁(η) = η·X·v, and its SE |η|·SE(X·v) when that is given: the first-order prediction of
    the entropy change of the step θ + ηv."""
    row = {"eta": eta, "delta_h1": eta * x_dot_v}
    if x_dot_v_se is not None:
        row["se"] = abs(eta) * x_dot_v_se
    return row


def first_order_report(X: dict[str, Tensor], v: dict[str, Tensor], directional: list[dict[str, Tensor]],
                       G: int, normalization: str, eta_list: list[float], precision: str = "float32") -> dict:
    """X·v from the reduced gradients, checked against the per-group forward-mode sums (which
    also give the SE), the per-module split, and δH₁ with its SE for each η. The cross-check's
    bounds depend on the passes' ``precision`` (:data:`entropy_probe.precision.CROSSCHECK_BOUNDS`)."""
    xv = gradients.dot(X, v)
    P, Q, S, T = (torch.cat([d[k] for d in directional]) for k in ("P", "Q", "S", "T"))
    xv_forward, se = estimators.directional_estimate(P, Q, S, T, G, normalization)
    rel_diff = abs(xv_forward - xv) / max(abs(xv), 1e-300) if xv_forward != xv else 0.0
    bounds = precisions.crosscheck_bounds(precision)
    in_se = abs(xv_forward - xv) / se if se > 0 else float("inf")
    if rel_diff > bounds["fail"] and in_se > bounds["fail_se"]:
        raise RuntimeError(
            f"X·v from the X gradient ({xv:.6g}) and from the directional pass ({xv_forward:.6g}) differ by "
            f"{rel_diff:.2%}, {in_se:.2g} SE (bound at {precision}: {bounds['fail']:.0e} relative"
            + (f" and {bounds['fail_se']:g} SE" if bounds["fail_se"] else "")
            + "): the two passes disagree, the result cannot be trusted"
        )
    if rel_diff > bounds["warn"]:
        log.warning("X·v: gradient %.8g vs directional %.8g (relative difference %.2g, %s)", xv, xv_forward,
                    rel_diff, precision)
    x_norm, v_norm = gradients.global_norm(X), gradients.global_norm(v)
    return {
        "X_dot_v": xv,
        "X_dot_v_se": se,
        "se_scope": SE_SCOPE,
        "X_dot_v_directional": xv_forward,
        "X_dot_v_relative_difference": rel_diff,
        "X_dot_v_difference_in_se": in_se,
        "precision": precision,
        "X_norm": x_norm,
        "v_norm": v_norm,
        "cosine_X_v": xv / (x_norm * v_norm) if x_norm > 0 and v_norm > 0 else None,
        "X_dot_v_by_module": gradients.grouped_dot(X, v),
        "num_prompt_groups": int(P.numel()),
        "normalization": normalization,
        "delta_h1": [delta_h1(eta, xv, se) for eta in eta_list],
    }


def format_table(report: dict) -> str:
    """A one-screen text table of δH₁ per η and the per-module split."""
    unit = norm.get(report["normalization"]).unit
    cosine = "-" if report["cosine_X_v"] is None else f"{report['cosine_X_v']:.4g}"
    lines = [
        f"δH₁(η) = η·X·v   ({unit}; SE: {report['se_scope']})",
        f"X·v = {report['X_dot_v']:.6g} ± {report['X_dot_v_se']:.3g}   |X| = {report['X_norm']:.4g}   "
        f"|v| = {report['v_norm']:.4g}   cos(X, v) = {cosine}   groups = {report['num_prompt_groups']}",
        "",
        f"{'eta':>12} {'delta_h1':>14} {'se':>12}",
    ]
    lines += [f"{r['eta']:>12.4g} {r['delta_h1']:>14.6g} {r['se']:>12.3g}" for r in report["delta_h1"]]
    lines += ["", f"{'module':<32} {'X·v share':>14}"]
    lines += [f"{name:<32} {value:>14.6g}" for name, value in report["X_dot_v_by_module"].items()]
    return "\n".join(lines) + "\n"


def u_jackknife(X: dict[str, Tensor], y_shards: list[tuple[dict[str, Tensor], float]], build_v) -> dict:
    """Delete-one-U-shard jackknife of X·v: the U-batch noise in v (DESIGN §2 "Error bars").

    ``y_shards``: (unnormalized Y gradient sum, normalizer share) per U shard; ``build_v`` maps a
    normalized Y to v (the same optimizer step as the full run). SE² = (K−1)/K Σ_s (x_s − x̄)².
    """
    K = len(y_shards)
    if K < 2:
        return {"available": False, "num_u_shards": K,
                "reason": "needs batch_config.U_num_shards >= 2 (the jackknife deletes one U shard at a time)"}
    total = gradients.sum_shards([g for g, _ in y_shards])
    total_share = sum(share for _, share in y_shards)
    values = []
    for grads, share in y_shards:
        Y_minus = {name: (total[name] - grads[name].double()) / (total_share - share) for name in total}
        values.append(gradients.dot(X, build_v(Y_minus)))
    x = torch.tensor(values, dtype=torch.float64)
    se = float(torch.sqrt((K - 1) / K * ((x - x.mean()) ** 2).sum()))
    return {"available": True, "num_u_shards": K, "X_dot_v_leave_one_shard_out": values, "X_dot_v_se_u": se}
