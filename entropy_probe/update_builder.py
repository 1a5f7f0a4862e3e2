"""Building the update vector v from a Y gradient and the configured optimizer (file loading
and provenance; the math is in :mod:`entropy_probe.update`)."""
from __future__ import annotations

import logging

from torch import Tensor

from . import gradients, models, shards
from .input_files import EMBEDDED, resolve_state_paths
from .checkpoint_step import training_meta
from .optimizer_state import load_adamw_state
from .trainer_checkpoint import load_trainer_checkpoint
from .update import FRESH_HYPER, clip_coefficient, update_direction, update_jacobian

log = logging.getLogger(__name__)


class UpdateBuilder:
    """Loads θ and the optimizer state once; :meth:`__call__` maps any Y (the full one, or a
    delete-one-shard Y for the jackknife) to v, :meth:`jacobian` gives ∂v/∂Y. ``optimizer`` overrides ``update.optimizer``
    (the step comparison builds the AdamW v of a checkpoint_diff run). With a trainer checkpoint
    as the policy (``model.checkpoint``), AdamW's state is its optimizer.pt in the Trainer's
    parameter order (:mod:`entropy_probe.trainer_checkpoint`), and v's metadata says at which η
    η·v is the trainer's next step (:func:`entropy_probe.checkpoint_step.training_meta`)."""

    def __init__(self, cfg: dict, policy_dir: str, y_fingerprint: str, y_label: str = "Y",
                 optimizer: str | None = None):
        upd = cfg["update"]
        self.optimizer, self.max_grad_norm = optimizer or upd["optimizer"], float(upd["max_grad_norm"])
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"update.optimizer {self.optimizer!r} does not map a Y to v (checkpoint_diff: "
                             "entropy_probe.checkpoint_step.step_vector)")
        self.theta, self.state = None, None
        trained = models.read_spec(policy_dir).get("checkpoint")
        self.meta = {"optimizer": self.optimizer, "model_fingerprint": y_fingerprint,
                     "max_grad_norm": self.max_grad_norm} | training_meta(trained, self.optimizer)
        if self.optimizer != "adamw":
            return
        fingerprint = models.fingerprint(policy_dir)
        if fingerprint != y_fingerprint:
            raise shards.ShardError(f"{y_label}: Y was computed for model {y_fingerprint}, "
                                    f"the policy {policy_dir} is {fingerprint}")
        model = models.load_policy(policy_dir, cfg["model"]["dtype"], "cpu", cfg["model"]["trainable"])
        self.theta = {name: p.detach() for name, p in model.named_parameters()}
        paths = None if trained else resolve_state_paths(upd, policy_dir, cfg["model"]["name_or_path"] == EMBEDDED)
        if trained:
            loaded = load_trainer_checkpoint(trained["path"], model).state
        elif paths is None:
            log.info("adamw without optimizer state: the first step of a fresh torch AdamW (betas %s, eps %g, "
                     "weight_decay %g)", FRESH_HYPER.betas, FRESH_HYPER.eps, FRESH_HYPER.weight_decay)
            self.meta |= {"optimizer_state": "", "optimizer_step": 0, "optimizer_param_groups": [
                {"betas": list(FRESH_HYPER.betas), "eps": FRESH_HYPER.eps, "weight_decay": FRESH_HYPER.weight_decay}]}
            return
        else:
            loaded = load_adamw_state(*paths, self.theta)
        self.state = loaded.per_param
        self.meta |= loaded.summary()
        log.info("adamw state %s: step %s, param groups %s", loaded.path,
                 loaded.steps[-1] if len(loaded.steps) == 1 else loaded.steps, loaded.groups)

    def __call__(self, Y: dict[str, Tensor], y_label: str = "Y") -> dict[str, Tensor]:
        if self.optimizer == "sgd":
            return update_direction("sgd", Y, max_grad_norm=self.max_grad_norm)
        unknown = sorted(set(Y) - set(self.theta))
        if unknown:
            raise shards.ShardError(f"{y_label}: Y has parameters the policy lacks: {unknown[:3]}")
        return update_direction("adamw", Y, {name: self.theta[name] for name in Y}, self.state, self.max_grad_norm)

    def jacobian(self, Y: dict[str, Tensor]) -> dict[str, Tensor]:
        """The diagonal of ∂v/∂Y at this Y (:func:`update.update_jacobian`), keyed like Y."""
        if self.optimizer == "sgd":
            return update_jacobian("sgd", Y, max_grad_norm=self.max_grad_norm)
        return update_jacobian("adamw", Y, {name: self.theta[name] for name in Y}, self.state, self.max_grad_norm)

    def describe(self, Y: dict[str, Tensor]) -> dict:
        """Metadata of v built from this Y (gradient norm, clip coefficient, optimizer details)."""
        return self.meta | {"grad_norm": gradients.global_norm(Y), "clip_coef": clip_coefficient(Y, self.max_grad_norm)}
