"""Building the update vector v from a Y gradient and the configured optimizer: the optimizer's
saved state loaded and mapped to the policy's parameters, and v's provenance (the maths is the
update rule of :mod:`entropy_probe.update`)."""
from __future__ import annotations

import logging

from torch import Tensor

from . import gradients, models, update
from .checkpoint_step import training_meta
from .input_files import EMBEDDED, resolve_state_paths
from .optimizer_state import load_adamw_state
from .shards import ShardError
from .trainer_checkpoint import load_trainer_checkpoint

log = logging.getLogger(__name__)


class UpdateBuilder:
    """Loads θ and the optimizer state once; :meth:`__call__` maps any Y (the full one, or a
    delete-one-shard Y for the jackknife) to v, :meth:`jacobian` gives ∂v/∂Y. ``optimizer``
    overrides ``update.optimizer`` (the step comparison builds the AdamW v of a checkpoint_diff
    run). With a trainer checkpoint as the policy (``model.checkpoint``), AdamW's state is its
    optimizer.pt in the Trainer's parameter order (:mod:`entropy_probe.trainer_checkpoint`), and
    v's metadata says at which η η·v is the trainer's next step
    (:func:`entropy_probe.checkpoint_step.training_meta`)."""

    def __init__(self, cfg: dict, policy_dir: str, y_fingerprint: str, y_label: str = "Y",
                 optimizer: str | None = None):
        upd = cfg["update"]
        self.optimizer, self.max_grad_norm = optimizer or upd["optimizer"], float(upd["max_grad_norm"])
        self.rule = update.get(self.optimizer)
        self.theta, self.state = None, None
        trained = models.read_spec(policy_dir).get("checkpoint")
        self.meta = {"optimizer": self.optimizer, "model_fingerprint": y_fingerprint,
                     "max_grad_norm": self.max_grad_norm} | training_meta(trained, self.optimizer)
        if not self.rule.uses_state:
            return
        fingerprint = models.fingerprint(policy_dir)
        if fingerprint != y_fingerprint:
            raise ShardError(f"{y_label}: Y was computed for model {y_fingerprint}, the policy {policy_dir} is "
                             f"{fingerprint}")
        model = models.load_policy(policy_dir, cfg["model"]["dtype"], "cpu", cfg["model"]["trainable"])
        self.theta = {name: p.detach() for name, p in model.named_parameters()}
        paths = None if trained else resolve_state_paths(upd, policy_dir, cfg["model"]["name_or_path"] == EMBEDDED)
        if trained:
            loaded = load_trainer_checkpoint(trained["path"], model).state
        elif paths is None:
            hyper = update.FRESH_HYPER
            log.info("%s without optimizer state: the first step of a fresh torch AdamW (betas %s, eps %g, "
                     "weight_decay %g)", self.optimizer, hyper.betas, hyper.eps, hyper.weight_decay)
            self.meta |= {"optimizer_state": "", "optimizer_step": 0, "optimizer_param_groups": [
                {"betas": list(hyper.betas), "eps": hyper.eps, "weight_decay": hyper.weight_decay}]}
            return
        else:
            loaded = load_adamw_state(*paths, self.theta)
        self.state = loaded.per_param
        self.meta |= loaded.summary()
        log.info("%s state %s: step %s, param groups %s", self.optimizer, loaded.path,
                 loaded.steps[-1] if len(loaded.steps) == 1 else loaded.steps, loaded.groups)

    def _theta_of(self, Y: dict[str, Tensor], y_label: str) -> dict[str, Tensor] | None:
        if self.theta is None:
            return None
        unknown = sorted(set(Y) - set(self.theta))
        if unknown:
            raise ShardError(f"{y_label}: Y has parameters the policy lacks: {unknown[:3]}")
        return gradients.restrict(self.theta, Y)

    def __call__(self, Y: dict[str, Tensor], y_label: str = "Y") -> dict[str, Tensor]:
        return self.rule.direction(Y, self._theta_of(Y, y_label), self.state, self.max_grad_norm)

    def jacobian(self, Y: dict[str, Tensor]) -> dict[str, Tensor]:
        """The diagonal of ∂v/∂Y at this Y (:attr:`update.UpdateRule.jacobian`), keyed like Y."""
        return self.rule.jacobian(Y, self._theta_of(Y, "Y"), self.state, self.max_grad_norm)

    def describe(self, Y: dict[str, Tensor]) -> dict:
        """Metadata of v built from this Y (gradient norm, clip coefficient, optimizer details)."""
        return self.meta | {"grad_norm": gradients.global_norm(Y),
                            "clip_coef": update.clip_coefficient(Y, self.max_grad_norm)}
