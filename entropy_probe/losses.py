"""The GRPO objective on the U batch (DESIGN §2 "Y and v", §2b "Trainer loss normalizations"):
group advantages and the registry of loss types, the one place every trainer's normalization is
written down (in the style of verl's ``core_algos.py``).

On-policy, with the ratio at 1, clipping inactive and KL 0, every loss type is
J = Σ_i c_i Σ_k log p_ik over the U batch's responses i (prompt-major, b·G + g), p = softmax(z/τ)
(no top-p: what trainers use), and Y = ∇J (ascent). c_i = a_i / Z is split into a per-response
numerator a_i and a normalizer Z = Σ_i z_i, so that shards accumulate Σ a_i ∇ Σ_k log p_ik and the
reduction divides once (and a leave-one-shard-out jackknife can drop a shard's z's).

Imports no torch: the config check reads the registry (:func:`check_config`) while the Snakefile
parses; the weight functions work with the methods of the tensors they are given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .errors import ConfigError, ProbeError

if TYPE_CHECKING:
    from torch import Tensor

SCALE_MODES = ("none", "group", "batch")
STD_EPS = 1e-4  # GRPO / TRL: A / (std + 1e-4)


def scale_mode(value) -> str:
    """``update.scale_rewards``: true = ``group`` (GRPO), false = ``none``, or a TRL mode."""
    if value is True:
        return "group"
    if value is False:
        return "none"
    if value not in SCALE_MODES:
        raise ValueError(f"update.scale_rewards: {value!r} is not one of true, false, {', '.join(SCALE_MODES)}")
    return value


def group_advantages(rewards: Tensor, scale) -> Tensor:
    """A = r − mean_g r per prompt group, ``[B, G] -> [B, G]``; ``group`` also divides by the
    group's (unbiased) std + 1e-4, ``batch`` by the whole batch's; G = 1 gives A = 0 (the std
    is taken as 0, not NaN)."""
    mode = scale_mode(scale)
    centred = rewards - rewards.mean(-1, keepdim=True)
    if mode == "group":
        std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else centred.new_zeros(centred.shape)
        centred = centred / (std + STD_EPS)
    elif mode == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        centred = centred / (std + STD_EPS)
    return centred


def informative_groups(rewards: Tensor) -> int:
    """Prompt groups whose advantages are not all zero (rewards not all equal), ``[B, G] -> int``:
    only they contribute to Y."""
    return int((rewards != rewards[:, :1]).any(-1).sum())


class NoSignalError(ValueError, ProbeError):
    """The U batch gives the update no gradient (every group's advantages are zero)."""


@dataclass(frozen=True)
class LossSettings:
    """Loss-type settings that are config keys (``update.*``); 0 = unset."""

    max_completion_length: int = 0
    loss_scale_factor: float = 0.0
    micro_batch_size: int = 0


@dataclass(frozen=True)
class LossType:
    name: str
    formula: str
    weights: Callable[[Tensor, Tensor, LossSettings], tuple[Tensor, Tensor]]  # (a, z), each [B, G]
    needs: tuple[str, ...] = ()


def _require(settings: LossSettings, key: str, loss: str):
    value = getattr(settings, key)
    if not value or value <= 0:
        raise ValueError(f"update.{key}: must be > 0 for update.loss_type {loss!r}")
    return value


def _token_mean(A, T, s):
    return A, T.double()


def _seq_mean_token_mean(A, T, s):
    return A / T.double(), A.new_ones(A.shape)


def _seq_mean_token_sum(A, T, s):
    return A, A.new_ones(A.shape)


def _dr_grpo(A, T, s):
    L = _require(s, "max_completion_length", "dr_grpo")
    return A, A.new_full(A.shape, float(L))


def _prompt_max_len(A, T, s):
    B, G = A.shape
    L_max = T.double().max(-1, keepdim=True).values
    return A / (G * L_max), A.new_full(A.shape, 1.0 / G)


def _seq_mean_token_sum_norm(A, T, s):
    factor = _require(s, "loss_scale_factor", "seq-mean-token-sum-norm")
    return A, A.new_full(A.shape, factor / A.numel())


def _bnpo(A, T, s):
    """Per micro-batch of ``micro_batch_size`` consecutive responses: Σ A log p / Σ T of the
    micro-batch, averaged over the M micro-batches (gradient accumulation). As in TRL the
    micro-batch size divides the step's batch."""
    size = _require(s, "micro_batch_size", "bnpo")
    flat_T = T.double().reshape(-1)
    n = flat_T.numel()
    if n % size:
        raise ValueError(f"update.micro_batch_size: {size} does not divide the U batch's {n} responses "
                         "(TRL requires per_device_train_batch_size to divide the generation batch)")
    tokens = flat_T.reshape(-1, size).sum(-1).clamp(min=1.0)  # per micro-batch
    per_response = tokens.repeat_interleave(size).reshape(A.shape)
    return A / (tokens.numel() * per_response), A.new_full(A.shape, 1.0 / n)


_TYPES = [
    LossType("token_mean", "Σ_i Σ_k A_i log p_ik / Σ_i T_i (DAPO)", _token_mean),
    LossType("seq_mean_token_mean", "(1/N) Σ_i (1/T_i) Σ_k A_i log p_ik (GRPO)", _seq_mean_token_mean),
    LossType("seq_mean_token_sum", "(1/N) Σ_i Σ_k A_i log p_ik", _seq_mean_token_sum),
    LossType("dr_grpo", "Σ_i Σ_k A_i log p_ik / (N · max_completion_length) (TRL dr_grpo)", _dr_grpo,
             ("max_completion_length",)),
    LossType("seq_mean_token_sum_prompt_max_len",
             "mean over prompts of Σ_{i∈b} Σ_k A_i log p_ik / (G · L_max of prompt b) (Dr-GRPO with each prompt's "
             "longest response; not TRL's dr_grpo)", _prompt_max_len),
    LossType("seq_mean_token_sum_norm", "Σ_i Σ_k A_i log p_ik / loss_scale_factor (verl)", _seq_mean_token_sum_norm,
             ("loss_scale_factor",)),
    LossType("bnpo", "mean over micro-batches of Σ_{i∈mb} Σ_k A_i log p_ik / Σ_{i∈mb} T_i (TRL bnpo)", _bnpo,
             ("micro_batch_size",)),
]
LOSS_TYPES = {t.name: t for t in _TYPES}
# trainers' names for the same quantities (TRL loss_type, verl loss_agg_mode)
ALIASES = {
    "dapo": "token_mean", "token-mean": "token_mean",
    "grpo": "seq_mean_token_mean", "seq-mean-token-mean": "seq_mean_token_mean",
    "seq-mean-token-sum": "seq_mean_token_sum", "seq-mean-token-sum-norm": "seq_mean_token_sum_norm",
}
NAMES = tuple(LOSS_TYPES) + tuple(ALIASES)


def resolve(name: str) -> LossType:
    canonical = ALIASES.get(name, name)
    if canonical not in LOSS_TYPES:
        raise ValueError(f"update.loss_type: unknown loss type {name!r} ({' | '.join(NAMES)})")
    return LOSS_TYPES[canonical]


def required_settings(loss_type: str) -> tuple[str, ...]:
    """The config keys a loss type needs set (> 0)."""
    return tuple(f"update.{key}" for key in resolve(loss_type).needs)


def describe_loss_types() -> list[tuple[str, str]]:
    """(names, formula) per loss type, aliases first joined by " = " (docs/science.md shows them)."""
    names = {t: [a for a, c in ALIASES.items() if c == t] + [t] for t in LOSS_TYPES}
    return [(" = ".join(names[t]), LOSS_TYPES[t].formula) for t in LOSS_TYPES]


def response_weights(loss_type: str, advantages: Tensor, lengths: Tensor, settings: LossSettings | None = None,
                     **setting_values) -> tuple[Tensor, Tensor]:
    """(a, z), each ``[B, G]`` float64, over the whole U batch: c_i = a_i / Σ z. Settings as a
    :class:`LossSettings` or as its fields."""
    settings = settings or LossSettings(**{k: v for k, v in setting_values.items() if v is not None})
    return resolve(loss_type).weights(advantages.double(), lengths, settings)


def response_coefficients(loss_type: str, advantages: Tensor, lengths: Tensor, settings: LossSettings | None = None,
                          **setting_values) -> Tensor:
    """c_i of J = Σ_i c_i Σ_k log p_ik, ``[B, G]`` float64 (whole U batch, prompt-major)."""
    a, z = response_weights(loss_type, advantages, lengths, settings, **setting_values)
    return a / z.sum()


def settings_from_config(config: dict) -> LossSettings:
    """The loss settings of a config: ``update``'s keys, ``max_completion_length`` 0 meaning
    ``generation.max_new_tokens`` (TRL's max_completion_length is the generation cap)."""
    upd = config["update"]
    return LossSettings(max_completion_length=upd["max_completion_length"] or config["generation"]["max_new_tokens"],
                        loss_scale_factor=upd["loss_scale_factor"], micro_batch_size=upd["micro_batch_size"])


def check_config(config: dict) -> None:
    """``update.loss_type`` is known and the settings it needs are set (> 0)."""
    loss_type = config["update"]["loss_type"]
    try:
        needs = resolve(loss_type).needs
    except ValueError as err:
        raise ConfigError(str(err)) from err
    settings = settings_from_config(config)
    for key in needs:
        if not getattr(settings, key) > 0:
            raise ConfigError(f"update.{key}: must be > 0 for update.loss_type {loss_type!r}")
