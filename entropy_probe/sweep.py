"""The step sizes η a run evaluates: the SNIS sweep (``estimator.eta_list``, ±η with central
differences, and the η of the trainer's step when v records one) and the η of the fresh rollouts
(``estimator.fresh_etas``), with the spelling of an η in a file name.

Torch-free: the Snakefile builds the fresh-rollout jobs from it while it parses.
"""
from __future__ import annotations

import math


def with_training_eta(etas: list[float], training_eta: float | None) -> list[float]:
    """``etas`` with the η of the trainer's step (v's ``training_eta``: a checkpoint's learning
    rate, or 1 for a checkpoint difference) added in order when no η of the list is it."""
    etas = [float(e) for e in etas]
    if training_eta is None or any(math.isclose(e, training_eta, rel_tol=1e-9) for e in etas):
        return etas
    return sorted(etas + [float(training_eta)])


def sweep_etas(estimator: dict, training_eta: float | None = None) -> list[float]:
    """The η values the SNIS pass evaluates: eta_list (and the training η, if any), plus −η for
    each when central differences are asked for, sorted."""
    etas = set(with_training_eta(estimator["eta_list"], training_eta))
    if estimator["central_difference"]:
        etas |= {-e for e in etas}
    return sorted(etas)


def fresh_etas(estimator: dict) -> list[float]:
    """The η of the fresh rollouts (``estimator.fresh_etas``): the listed values, or ``eta_list``
    when it is null (the default); sorted, distinct."""
    etas = estimator.get("fresh_etas")
    return sorted({float(e) for e in (estimator["eta_list"] if etas is None else etas)})


def eta_tag(eta) -> str:
    """The η in a file name (results/fresh/eta_<tag>/): Python's shortest repr, which float()
    reads back exactly ("1e-05", "0.0003", "-0.001")."""
    return repr(float(eta))
