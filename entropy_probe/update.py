"""The update vector v = Δθ/η of one optimizer step on the U batch (DESIGN §2 "Y and v").

Pure tensor maths: dicts of tensors keyed by parameter name in, dicts out, all in float64.
Reading a saved optimizer state and mapping it to names is :mod:`entropy_probe.optimizer_state`.

Y is the ascent direction of the GRPO objective; the trainer's loss gradient is g = −Y.

- SGD: θ' = θ − η·g, so v = −g = Y (after the optional clipping of g).
- AdamW (torch's ``torch.optim.AdamW``, one step from the saved state; per parameter):
  t' = t + 1, m' = β1·m + (1−β1)·g, s' = β2·s + (1−β2)·g²,
  v = −(m'/(1−β1^t')) / (sqrt(s'/(1−β2^t')) + eps) − wd·θ,
  which is (θ_after − θ_before)/lr of ``AdamW.step()`` exactly (the step is linear in lr).
  With no saved state: the first step of a fresh ``torch.optim.AdamW()`` with torch's defaults,
  m = s = 0, t = 0, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01 — then v = −g/(|g| + eps)
  − 0.01·θ elementwise, i.e. ≈ sign(Y) − 0.01·θ.

Gradient clipping (``max_grad_norm`` > 0) scales g as ``torch.nn.utils.clip_grad_norm_`` does,
over the parameters that have a gradient (the keys of Y): coef = min(1, max_norm/(‖g‖ + 1e-6)).
A parameter without a gradient (in ``params`` but not in Y) gets v = 0: torch skips it.

The linearization of the step in Y (:func:`update_jacobian`, for the attribution of v to the U
batch and its U-batch noise): both rules act elementwise once the clip coefficient κ is fixed, so
J = ∂v/∂Y is diagonal. SGD: J = κ. AdamW, with g = −κY, A = m'/(1−β1^t'), r = sqrt(s'/(1−β2^t')),
d = r + eps:  ∂v/∂Y = κ [ (1−β1)/((1−β1^t') d) − A (1−β2) g / ((1−β2^t') r d²) ]  (second term 0
where r = 0). Held fixed: κ (its dependence on ‖Y‖ is not linearized).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: coef = max_norm / (total_norm + 1e-6)


@dataclass(frozen=True)
class AdamWHyper:
    """The hyperparameters of one AdamW param group that v depends on (lr does not: v is per unit lr)."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01


FRESH_HYPER = AdamWHyper()  # torch.optim.AdamW()'s defaults


@dataclass
class AdamWParamState:
    """The saved AdamW state of one parameter: step count t, exp_avg m and exp_avg_sq s (None
    for a parameter the optimizer never stepped: zeros, as torch initializes them), and the
    hyperparameters of its group."""

    step: float = 0.0
    exp_avg: Tensor | None = None
    exp_avg_sq: Tensor | None = None
    hyper: AdamWHyper = field(default_factory=AdamWHyper)


def clip_coefficient(grads: dict[str, Tensor], max_grad_norm: float) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` multiplies every
    gradient by (global L2 norm over all of them); 1.0 when ``max_grad_norm`` is 0 (no clipping)."""
    if max_grad_norm < 0:
        raise ValueError(f"max_grad_norm must be >= 0, got {max_grad_norm}")
    if max_grad_norm == 0 or not grads:
        return 1.0
    total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    return min(1.0, max_grad_norm / (total + CLIP_EPS))


def sgd_direction(Y: dict[str, Tensor], max_grad_norm: float = 0.0) -> dict[str, Tensor]:
    """SGD ascends the GRPO objective: θ' = θ + η·Y (clipped), so v = Y (times the clip factor)."""
    coef = clip_coefficient(Y, max_grad_norm)
    return {name: g.double() * coef for name, g in Y.items()}


def adamw_direction(
    Y: dict[str, Tensor],
    params: dict[str, Tensor],
    state: dict[str, AdamWParamState] | None = None,
    max_grad_norm: float = 0.0,
) -> dict[str, Tensor]:
    """v of one AdamW step for every parameter in ``params`` (θ, needed for the weight decay).

    ``state`` maps names to their saved state; None = a fresh optimizer (torch's defaults). With a
    state, every parameter of Y must be in it (else the optimizer would not update it: an error,
    not a silent zero). Parameters of ``params`` absent from Y have no gradient and get v = 0.
    """
    unknown = sorted(set(Y) - set(params))
    if unknown:
        raise ValueError(f"Y has gradients for parameters the policy lacks: {unknown[:3]}")
    if state is not None:
        uncovered = sorted(set(Y) - set(state))
        if uncovered:
            raise ValueError(
                f"{len(uncovered)} parameters with a gradient are in no param group of the optimizer state "
                f"(it would not update them), e.g. {uncovered[:3]}; narrow model.param_filter to the "
                "optimized parameters"
            )
    grads = {name: -g.double() for name, g in Y.items()}
    coef = clip_coefficient(grads, max_grad_norm)
    v = {}
    for name, theta in params.items():
        theta = theta.detach().double().cpu()
        if name not in grads:
            v[name] = torch.zeros_like(theta)
            continue
        g = grads[name] * coef
        if g.shape != theta.shape:
            raise ValueError(f"{name}: gradient shape {tuple(g.shape)} != parameter shape {tuple(theta.shape)}")
        st = AdamWParamState(hyper=FRESH_HYPER) if state is None else state[name]
        v[name] = _adamw_param_direction(name, theta, g, st)
    return v


def _adamw_moments(name: str, g: Tensor, st: AdamWParamState) -> tuple[Tensor, Tensor, float, float]:
    """(m', s', 1 − β1^t', sqrt(1 − β2^t')) of one parameter after a step with gradient g."""
    beta1, beta2 = (float(b) for b in st.hyper.betas)
    m = torch.zeros_like(g) if st.exp_avg is None else st.exp_avg.detach().double().cpu()
    s = torch.zeros_like(g) if st.exp_avg_sq is None else st.exp_avg_sq.detach().double().cpu()
    for label, x in (("exp_avg", m), ("exp_avg_sq", s)):
        if x.shape != g.shape:
            raise ValueError(f"{name}: {label} shape {tuple(x.shape)} != parameter shape {tuple(g.shape)}")
    t = float(st.step) + 1.0
    m = beta1 * m + (1.0 - beta1) * g
    s = beta2 * s + (1.0 - beta2) * g * g
    return m, s, 1.0 - beta1**t, math.sqrt(1.0 - beta2**t)


def _adamw_param_direction(name: str, theta: Tensor, g: Tensor, st: AdamWParamState) -> Tensor:
    m, s, bias1, bias2_sqrt = _adamw_moments(name, g, st)
    denom = s.sqrt() / bias2_sqrt + float(st.hyper.eps)
    return -(m / bias1) / denom - float(st.hyper.weight_decay) * theta


def _adamw_param_jacobian(name: str, g: Tensor, st: AdamWParamState, coef: float) -> Tensor:
    """∂v/∂Y of one parameter (module docstring), g = −κY the clipped loss gradient."""
    beta1, beta2 = (float(b) for b in st.hyper.betas)
    m, s, bias1, bias2_sqrt = _adamw_moments(name, g, st)
    r = s.sqrt() / bias2_sqrt
    d = r + float(st.hyper.eps)
    through_s = torch.where(r > 0, (m / bias1) * (1.0 - beta2) * g / (bias2_sqrt**2 * r.clamp(min=1e-300) * d * d), 0.0)
    return coef * ((1.0 - beta1) / (bias1 * d) - through_s)


def _sgd_jacobian(Y, params, state, max_grad_norm):
    coef = clip_coefficient(Y, max_grad_norm)
    return {name: torch.full_like(g, coef, dtype=torch.float64) for name, g in Y.items()}


def _adamw_jacobian(Y, params, state, max_grad_norm):
    grads = {name: -g.double() for name, g in Y.items()}
    coef = clip_coefficient(grads, max_grad_norm)
    out = {}
    for name, g in grads.items():
        st = AdamWParamState(hyper=FRESH_HYPER) if state is None else state[name]
        out[name] = _adamw_param_jacobian(name, g * coef, st, coef)
    return out


def _sgd_direction(Y, params, state, max_grad_norm):
    if state is not None:
        raise ValueError("update.optimizer: sgd takes no optimizer state")
    return sgd_direction(Y, max_grad_norm)


def _adamw_direction(Y, params, state, max_grad_norm):
    if params is None:
        raise ValueError("update.optimizer: adamw needs the parameters θ (for the weight decay)")
    return adamw_direction(Y, params, state, max_grad_norm)


@dataclass(frozen=True)
class UpdateRule:
    """One optimizer step as a function of the batch gradient Y (``update.optimizer``):
    ``direction(Y, θ, saved state, max_grad_norm)`` = v, keyed like Y (AdamW: like θ), and
    ``jacobian(...)`` = the diagonal of ∂v/∂Y at this Y (the clip coefficient held fixed),
    keyed like Y; ``uses_state``: it reads the optimizer's saved state (and θ)."""

    name: str
    direction: Callable
    jacobian: Callable
    uses_state: bool


UPDATE_RULES = {
    "sgd": UpdateRule("sgd", _sgd_direction, _sgd_jacobian, uses_state=False),
    "adamw": UpdateRule("adamw", _adamw_direction, _adamw_jacobian, uses_state=True),
}


def get(optimizer: str) -> UpdateRule:
    if optimizer not in UPDATE_RULES:
        raise ValueError(f"update.optimizer: unknown optimizer {optimizer!r} ({' | '.join(UPDATE_RULES)})")
    return UPDATE_RULES[optimizer]


def update_direction(optimizer: str, Y: dict[str, Tensor], params: dict[str, Tensor] | None = None,
                     state: dict[str, AdamWParamState] | None = None, max_grad_norm: float = 0.0) -> dict[str, Tensor]:
    """v of the update rule ``optimizer`` (:data:`UPDATE_RULES`)."""
    return get(optimizer).direction(Y, params, state, max_grad_norm)


def update_jacobian(optimizer: str, Y: dict[str, Tensor], params: dict[str, Tensor] | None = None,
                    state: dict[str, AdamWParamState] | None = None, max_grad_norm: float = 0.0) -> dict[str, Tensor]:
    """The diagonal of J = ∂v/∂Y of the update rule ``optimizer`` at this Y (module docstring: the
    clip coefficient held fixed), float64, keyed like Y. X·J·Y is the part of X·v that is linear
    in the batch gradient."""
    return get(optimizer).jacobian(Y, params, state, max_grad_norm)


def scaled(v: dict[str, Tensor], factor: float) -> dict[str, Tensor]:
    """factor·v: the step of an update variant with ``lr_factor`` = factor, at the same η (its
    rule's step at learning rate factor·η)."""
    return v if factor == 1.0 else {name: factor * t for name, t in v.items()}
