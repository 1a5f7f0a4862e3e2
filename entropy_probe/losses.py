"""The GRPO objective's per-response weights: the one place for advantages and loss normalizations
(DESIGN §2 "Y and v", §2b "Trainer loss normalizations").

On-policy (importance ratio 1, clipping inactive), KL 0, the objective of one optimizer step on the
U batch (N = B·G responses, prompt-major order i = b·G + g, lengths T_i) is

    J = Σ_i c_i Σ_k log p_ik,    p = softmax(z/τ) (no top-p: what trainers use),

and Y = ∇J. :func:`response_coefficients` gives c ``[B, G]`` for every loss type of
:data:`LOSS_TYPES`. Every type but ``bnpo`` has one global normalizer that is a sum over
responses: c_i = w_i / Z with Z = Σ_i z_i, so a subset S of the responses (a U shard) carries
Σ_{i∈S} w_i Σ_k log p_ik and Z(S) = Σ_{i∈S} z_i (:func:`shard_terms`, :func:`global_normalizer`);
``bnpo`` normalizes each micro-batch by its own token count and has no such split.

What the trainers do (TRL 1.16 ``trl/trainer/grpo_trainer.py``, ``GRPOTrainer._compute_loss``; verl
``verl/trainer/ppo/core_algos.py``, ``agg_loss``):

- TRL ``grpo`` / verl ``seq-mean-token-mean``: per micro-batch the mean over sequences of
  Σ_k/T_i, divided by the accumulation steps: with equal micro-batches c_i = A_i / (N·T_i).
- TRL ``dapo`` / verl ``token-mean``: Σ_k over the micro-batch / (``num_items_in_batch``, the
  token count of the whole generation batch, × accumulation steps / ``steps_per_generation``),
  summed over micro-batches: c_i = A_i / Σ_j T_j (one generation batch per optimizer step).
- TRL ``bnpo``: Σ_k over the micro-batch / its own token count, divided by the accumulation steps:
  c_i = A_i / (M · T_mb(i)), M = N / ``micro_batch_size`` micro-batches, T_mb(i) the tokens of
  i's micro-batch (consecutive in U order here; TRL shuffles the generation batch before cutting
  it, ``shuffle_sequence_dict``).
- TRL ``dr_grpo``: Σ_k over the micro-batch / (micro-batch size · ``max_completion_length``), divided
  by the accumulation steps: c_i = A_i / (N·L).
- verl ``seq-mean-token-sum``: c_i = A_i / N. ``seq-mean-token-sum-norm``: the same divided by
  ``loss_scale_factor`` (verl's default is the padded width of each micro-batch: here an explicit
  setting), c_i = A_i / (N·F).
- ``seq_mean_token_sum_prompt_max_len`` (this project's per-prompt Dr-GRPO): per prompt b divide by
  G·L_max(b), then mean over the B prompts: c_i = A_i / (B·G·L_max(b)). Not TRL's ``dr_grpo``.

Multi-process data parallelism averages the per-process gradients, which leaves these formulas
unchanged (each process's micro-batch is one of the M micro-batches).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)
SCALES = ("none", "group", "batch")

MAX_COMPLETION_LENGTH = "update.max_completion_length"
LOSS_SCALE_FACTOR = "update.loss_scale_factor"
MICRO_BATCH_SIZE = "update.micro_batch_size"
_SETTING_NAMES = {MAX_COMPLETION_LENGTH: "max_completion_length", LOSS_SCALE_FACTOR: "loss_scale_factor",
                  MICRO_BATCH_SIZE: "micro_batch_size"}


def _unbiased_std(x: Tensor, dim: int | None = None) -> Tensor:
    """Bessel-corrected std (TRL's ``nanstd``, without NaNs); a single value has std 0."""
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:
        return torch.zeros_like(x.mean() if dim is None else x.mean(dim, keepdim=True))
    return x.std() if dim is None else x.std(dim, keepdim=True, correction=1)


def group_advantages(rewards: Tensor, scale: str | bool) -> Tensor:
    """A_bg = r_bg − mean_g r_bg, ``[B, G] -> [B, G]``, as TRL 1.16 computes it
    (``GRPOTrainer._generate_and_score_completions``, ``multi_objective_aggregation="sum_then_normalize"``):

    - ``none``: A unscaled;
    - ``group``: A / (std_g(r_b·) + 1e-4), the unbiased std over the prompt's G responses;
    - ``batch``: A / (std(r) + 1e-4), the unbiased std over all B·G rewards of the batch.

    ``True``/``False`` mean ``group``/``none``, as in TRL's ``GRPOConfig``. A std over one value is
    0 (G = 1 gives A = 0, never NaN).
    """
    scale = {True: "group", False: "none"}.get(scale, scale)
    if scale not in SCALES:
        raise ValueError(f"scale_rewards must be one of {SCALES} (or true/false), got {scale!r}")
    centred = rewards - rewards.mean(-1, keepdim=True)
    if scale == "group":
        return centred / (_unbiased_std(rewards, -1) + STD_EPS)
    if scale == "batch":
        return centred / (_unbiased_std(rewards) + STD_EPS)
    return centred


@dataclass(frozen=True)
class LossType:
    """One normalization of the GRPO objective. ``weight(A, T, s)`` gives w ``[B, G]`` and
    ``normalizer_term(T)`` z ``[B, G]`` with c = w / Σz (None for a loss without one global
    normalizer, which gives c through ``coefficients`` instead). ``s`` holds the settings named
    in ``required`` (config keys)."""

    formula: str
    description: str
    required: tuple[str, ...] = ()
    weight: Callable[[Tensor, Tensor, dict], Tensor] | None = None
    normalizer_term: Callable[[Tensor], Tensor] | None = None
    coefficients: Callable[[Tensor, Tensor, dict], Tensor] | None = None

    @property
    def separable(self) -> bool:
        return self.normalizer_term is not None


def _ones(T: Tensor) -> Tensor:
    return torch.ones_like(T)


def _bnpo_coefficients(A: Tensor, T: Tensor, s: dict) -> Tensor:
    """c_i = A_i / (M · T_mb(i)): micro-batches of ``micro_batch_size`` consecutive responses."""
    size, n = s["micro_batch_size"], A.numel()
    if size < 1 or n % size:
        raise ValueError(f"{MICRO_BATCH_SIZE}: {size} does not divide the U batch's {n} responses into equal "
                         "micro-batches (the trainer's micro-batches are equal)")
    tokens = T.reshape(-1, size).sum(-1, keepdim=True).clamp(min=1.0)
    return (A.reshape(-1, size) / (tokens * (n // size))).reshape(A.shape)


_SEQ_MEAN_TOKEN_MEAN = LossType(
    formula="J = (1/N) Σ_i (1/T_i) Σ_k A_i log p_ik",
    description="mean over responses of each response's mean token term (TRL `grpo`, verl `seq-mean-token-mean`)",
    weight=lambda A, T, s: A / T.clamp(min=1.0), normalizer_term=_ones)
_TOKEN_MEAN = LossType(
    formula="J = Σ_i Σ_k A_i log p_ik / Σ_i T_i",
    description="sum over all tokens of the step's batch / its token count (TRL `dapo`, verl `token-mean`)",
    weight=lambda A, T, s: A, normalizer_term=lambda T: T)
_BNPO = LossType(
    formula="J = (1/M) Σ_m Σ_{i∈m} Σ_k A_i log p_ik / Σ_{i∈m} T_i, M micro-batches of micro_batch_size "
            "responses",
    description="token mean per micro-batch, averaged over the micro-batches (TRL `bnpo`); "
                "needs update.micro_batch_size",
    required=(MICRO_BATCH_SIZE,), coefficients=_bnpo_coefficients)


def _token_sum_over_constant(key: str, formula: str, description: str) -> LossType:
    """J = (1/N) Σ_i Σ_k A_i log p_ik / C, C the setting ``key`` (a constant of the run)."""
    setting = _SETTING_NAMES[key]
    return LossType(formula=formula, description=f"{description}; needs {key}", required=(key,),
                    weight=lambda A, T, s: A / float(s[setting]), normalizer_term=_ones)


_DR_GRPO = _token_sum_over_constant(
    MAX_COMPLETION_LENGTH, "J = Σ_i Σ_k A_i log p_ik / (N · L), L = max_completion_length",
    "token sum / (responses × max_completion_length, a constant) (TRL `dr_grpo`)")
_SEQ_MEAN_TOKEN_SUM_NORM = _token_sum_over_constant(
    LOSS_SCALE_FACTOR, "J = (1/N) Σ_i Σ_k A_i log p_ik / F, F = loss_scale_factor",
    "`seq-mean-token-sum` divided by a constant factor (verl `seq-mean-token-sum-norm`)")
_SEQ_MEAN_TOKEN_SUM = LossType(
    formula="J = (1/N) Σ_i Σ_k A_i log p_ik",
    description="mean over responses of each response's token sum (verl `seq-mean-token-sum`)",
    weight=lambda A, T, s: A, normalizer_term=_ones)
_PROMPT_MAX_LEN = LossType(
    formula="J = (1/B) Σ_b Σ_g Σ_k A_bg log p_bgk / (G · L_max(b)), L_max(b) = max_g T_bg",
    description="per prompt, token sum / (G × the prompt's longest response), mean over prompts "
                "(a per-prompt Dr-GRPO; not TRL `dr_grpo`)",
    weight=lambda A, T, s: A / (A.shape[-1] * T.amax(-1, keepdim=True).clamp(min=1.0)),
    normalizer_term=lambda T: torch.full_like(T, 1.0 / T.shape[-1]))

LOSS_TYPES: dict[str, LossType] = {
    "grpo": _SEQ_MEAN_TOKEN_MEAN, "seq-mean-token-mean": _SEQ_MEAN_TOKEN_MEAN,
    "seq_mean_token_mean": _SEQ_MEAN_TOKEN_MEAN,
    "dapo": _TOKEN_MEAN, "token-mean": _TOKEN_MEAN, "token_mean": _TOKEN_MEAN,
    "bnpo": _BNPO,
    "dr_grpo": _DR_GRPO,
    "seq-mean-token-sum": _SEQ_MEAN_TOKEN_SUM,
    "seq-mean-token-sum-norm": _SEQ_MEAN_TOKEN_SUM_NORM,
    "seq_mean_token_sum_prompt_max_len": _PROMPT_MAX_LEN,
}


def get_loss_type(name: str) -> LossType:
    try:
        return LOSS_TYPES[name]
    except KeyError:
        raise ValueError(f"update.loss_normalization: unknown loss type {name!r}; "
                         f"one of {sorted(LOSS_TYPES)}") from None


def required_settings(name: str) -> tuple[str, ...]:
    """The config keys ``name`` needs (e.g. ``("update.max_completion_length",)`` for ``dr_grpo``)."""
    return get_loss_type(name).required


def describe_loss_types() -> list[tuple[str, str, str]]:
    """(names, formula, description) per distinct objective, aliases joined by " = " (for the README)."""
    names: dict[int, list[str]] = {}
    for name, spec in LOSS_TYPES.items():
        names.setdefault(id(spec), []).append(name)
    specs = {id(spec): spec for spec in LOSS_TYPES.values()}
    return [(" = ".join(group), specs[key].formula, specs[key].description) for key, group in names.items()]


def _settings(name: str, spec: LossType, values: dict) -> dict:
    """The settings ``spec`` needs, each checked (a ValueError naming the missing config key)."""
    out = {}
    for key in spec.required:
        value = values.get(_SETTING_NAMES[key])
        if value is None:
            raise ValueError(f"{key} is required by update.loss_normalization {name!r} and is not set")
        if not value > 0:
            raise ValueError(f"{key} must be > 0, got {value}")
        out[_SETTING_NAMES[key]] = value
    return out


def response_coefficients(loss_type: str, advantages: Tensor, lengths: Tensor, *,
                          max_completion_length: int | None = None, loss_scale_factor: float | None = None,
                          micro_batch_size: int | None = None) -> Tensor:
    """c ``[B, G]`` float64 with J = Σ_i c_i Σ_k log p_ik over the WHOLE U batch (module docstring);
    ``advantages`` and ``lengths`` (T_i) ``[B, G]``, prompt-major."""
    spec = get_loss_type(loss_type)
    s = _settings(loss_type, spec, {"max_completion_length": max_completion_length,
                                    "loss_scale_factor": loss_scale_factor, "micro_batch_size": micro_batch_size})
    A, T = advantages.double(), lengths.double()
    if spec.coefficients is not None:
        return spec.coefficients(A, T, s)
    return spec.weight(A, T, s) / spec.normalizer_term(T).sum()


def shard_terms(loss_type: str, advantages: Tensor, lengths: Tensor, **settings) -> tuple[Tensor, float]:
    """(w ``[B, G]`` float64, Z(shard)) for a U shard of whole prompt groups: the shard carries
    Σ_i w_i Σ_k log p_ik, and J = Σ_shards of it / Σ_shards Z. A ValueError for a loss type with no
    global normalizer (``bnpo``: use :func:`response_coefficients` on the whole U batch)."""
    spec = get_loss_type(loss_type)
    if not spec.separable:
        raise ValueError(f"update.loss_normalization: {loss_type!r} normalizes each micro-batch separately; its "
                         "coefficients need the whole U batch (response_coefficients), not one shard")
    s = _settings(loss_type, spec, settings)
    T = lengths.double()
    return spec.weight(advantages.double(), T, s), float(spec.normalizer_term(T).sum())


def global_normalizer(loss_type: str, lengths: Tensor, subset: Tensor | None = None) -> float | None:
    """Z(S) = Σ_{i∈S} z_i over the responses of ``subset`` (bool ``[B, G]``, whole prompt groups;
    None = all), or None when the objective has no single global normalizer (``bnpo``). For the
    leave-one-shard-out jackknife: Y without shard s = (Σ_{s'≠s} Σ_{i∈s'} w_i ∇Σ_k log p_ik) / Z(U∖s)."""
    spec = get_loss_type(loss_type)
    if not spec.separable:
        return None
    z = spec.normalizer_term(lengths.double())
    return float(z.sum() if subset is None else z[subset].sum())
