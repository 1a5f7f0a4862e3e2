"""Rewards: map (response text, gold answer) to a float, and say why a response was not rewarded.

Every reward returns ``(value, code)``: the float reward and an outcome code from
:data:`OUTCOMES` (stored per response in the rollout shard as ``reward_codes``, the legend in the
shard's metadata). Code 0 means every check passed; the others say what failed — so a zero reward
always carries its reason. A plain function returning only a float is accepted too (code 0 when
the value is non-zero, ``zero_unspecified`` when it is zero).

Rewards (``reward.name``):

- ``exact_match``: 1.0 when the stripped response equals the stripped gold answer.
- ``math``: the response's final answer (``\\boxed{}``, LaTeX or a plain number; math-verify's
  extraction, the boxed answer first) checked against the gold answer with ``math-verify``.
- ``think_answer_math``: the response must read ``<think>…</think><answer>…</answer>`` (whitespace
  around the blocks allowed, nothing else); the content of ``<answer>`` is checked as in ``math``.
  value = correct + format_weight · (format ok)  (correct needs the format).
- ``custom``: a user callable ``f(response, gold) -> float | (float, reason)`` named
  ``module:function`` (importable from the working directory) or ``path/to/file.py:function``;
  ``reason`` is one of the names of :data:`OUTCOMES`.

A missing gold answer (None, NaN or empty) is an error, never a silent zero.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .errors import ProbeError
from .reward_config import NEEDS_MATH_VERIFY

# Outcome codes (int8 in the shard). 0: every check passed.
PASS, WRONG_ANSWER, NO_ANSWER, BAD_FORMAT, ZERO_UNSPECIFIED = 0, 1, 2, 3, 4
OUTCOMES = {
    PASS: "pass",
    WRONG_ANSWER: "wrong_answer",  # an answer was found and it is not the gold one
    NO_ANSWER: "no_answer",  # no answer could be extracted from the response (empty, unparsable)
    BAD_FORMAT: "bad_format",  # the required <think>…</think><answer>…</answer> layout is missing
    ZERO_UNSPECIFIED: "zero_unspecified",  # a custom reward returned 0 without a reason
}
_CODE_BY_NAME = {name: code for code, name in OUTCOMES.items()}

REWARD_NAMES = ("exact_match", "math", "think_answer_math", "custom")


class RewardError(ValueError, ProbeError):
    """A reward that cannot be computed: missing gold answer, bad custom callable, bad return value."""


def is_missing(gold) -> bool:
    return gold is None or (isinstance(gold, float) and math.isnan(gold)) or (isinstance(gold, str) and not gold.strip())


# ---------------------------------------------------------------------------------------- exact


def exact_match(response: str, gold: str) -> float:
    """1.0 when the stripped response equals the stripped gold answer, else 0.0."""
    return float(response.strip() == gold.strip())


def exact_match_outcome(response: str, gold: str) -> tuple[float, int]:
    value = exact_match(response, gold)
    if value:
        return value, PASS
    return value, NO_ANSWER if not response.strip() else WRONG_ANSWER


# ----------------------------------------------------------------------------------------- math


def _math_verify_kwargs() -> tuple[dict, dict]:
    """math-verify times out with signal.alarm, which only works in the main thread."""
    if threading.current_thread() is threading.main_thread():
        return {}, {}
    return {"parsing_timeout": None}, {"timeout_seconds": None}


def parse_gold(gold: str):
    """The gold answer parsed by math-verify: as written, else as LaTeX math ``$gold$``. A gold
    answer in which math-verify finds no mathematical expression is an error (a data problem,
    not a zero)."""
    import sympy
    from math_verify import parse

    parse_kw, _ = _math_verify_kwargs()
    for text in (gold, f"${gold}$"):
        parsed = parse(text, **parse_kw)
        if any(isinstance(x, (sympy.Basic, sympy.MatrixBase)) for x in parsed):
            return parsed
    raise RewardError(f"gold answer {gold!r} cannot be parsed by math-verify (use reward.name: exact_match "
                      "or a custom reward for non-mathematical answers)")


_GOLD_CACHE: dict[str, object] = {}


def math_outcome(response: str, gold: str) -> tuple[float, int]:
    """1.0 when math-verify finds an answer in ``response`` equal to the gold answer."""
    from math_verify import parse, verify

    parse_kw, verify_kw = _math_verify_kwargs()
    if gold not in _GOLD_CACHE:
        _GOLD_CACHE[gold] = parse_gold(gold)
    answer = parse(response, **parse_kw) if response.strip() else []
    if not answer:
        return 0.0, NO_ANSWER
    return (1.0, PASS) if verify(_GOLD_CACHE[gold], answer, **verify_kw) else (0.0, WRONG_ANSWER)


THINK_ANSWER = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def think_answer_math_outcome(response: str, gold: str, format_weight: float = 0.0) -> tuple[float, int]:
    """value = correct + format_weight·format_ok; the answer is the content of <answer>."""
    found = THINK_ANSWER.fullmatch(response)
    if found is None or "<think>" in found.group(1) or "<answer>" in found.group(2):
        return 0.0, BAD_FORMAT
    value, code = math_outcome(found.group(2), gold)
    return value + format_weight, code


# --------------------------------------------------------------------------------------- custom


def load_callable(spec: str) -> Callable:
    """``module:function`` (imported with the working directory on sys.path) or
    ``path/to/file.py:function``."""
    target, sep, func_name = spec.rpartition(":")
    if not sep or not target or not func_name:
        raise RewardError(f"reward.function: {spec!r} is not 'module:function' or 'path/to/file.py:function'")
    try:
        if target.endswith(".py") or "/" in target or "\\" in target:
            path = Path(target).expanduser()
            if not path.is_file():
                raise RewardError(f"reward.function: file {target!r} does not exist")
            module_spec = importlib.util.spec_from_file_location(f"entropy_probe_user_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(target)
    except RewardError:
        raise
    except Exception as err:
        raise RewardError(f"reward.function: cannot import {target!r} ({type(err).__name__}: {err})") from err
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise RewardError(f"reward.function: {target!r} has no callable {func_name!r}")
    return fn


def _normalize(result, source: str) -> tuple[float, int]:
    """(value, code) from what a reward function returned: a float or (float, reason)."""
    if isinstance(result, tuple):
        if len(result) != 2:
            raise RewardError(f"{source} returned a tuple of {len(result)} items; expected (reward, reason)")
        value, reason = result
        if isinstance(reason, str):
            if reason not in _CODE_BY_NAME:
                raise RewardError(f"{source} returned reason {reason!r}; known reasons: {sorted(_CODE_BY_NAME)}")
            code = _CODE_BY_NAME[reason]
        elif isinstance(reason, int) and reason in OUTCOMES:
            code = reason
        else:
            raise RewardError(f"{source} returned reason {reason!r}; known reasons: {sorted(_CODE_BY_NAME)}")
    else:
        value, code = result, None
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise RewardError(f"{source} returned {value!r}, not a number") from err
    if not math.isfinite(value):
        raise RewardError(f"{source} returned a non-finite reward {value}")
    if code is None:
        code = PASS if value != 0 else ZERO_UNSPECIFIED
    return value, code


# ------------------------------------------------------------------------------------- registry

REWARDS = {"exact_match": exact_match_outcome, "math": math_outcome, "think_answer_math": think_answer_math_outcome}


def get_reward(name: str, function: str = "", format_weight: float = 0.0) -> Callable[[str, str], tuple[float, int]]:
    """The reward ``f(response, gold) -> (value, code)`` for ``reward.name`` (and its options)."""
    if name == "custom":
        fn, source = load_callable(function), f"reward.function {function!r}"

        def custom(response: str, gold: str) -> tuple[float, int]:
            try:
                result = fn(response, gold)
            except Exception as err:  # the user's code: whatever it raises is a reward that cannot be computed
                raise RewardError(f"{source} raised {type(err).__name__}: {err}") from err
            return _normalize(result, source)

        return custom
    if name not in REWARDS:
        raise RewardError(f"reward.name: unknown reward {name!r} (known: {list(REWARD_NAMES)})")
    if name in NEEDS_MATH_VERIFY and importlib.util.find_spec("math_verify") is None:
        raise RewardError(f"reward.name: {name!r} needs the math-verify package (pip install math-verify)")
    if name == "think_answer_math":
        return lambda response, gold: think_answer_math_outcome(response, gold, format_weight)
    return REWARDS[name]


def from_config(reward_cfg: dict) -> Callable[[str, str], tuple[float, int]]:
    """The reward of a config's ``reward`` section."""
    return get_reward(reward_cfg["name"], reward_cfg.get("function", ""), float(reward_cfg.get("format_weight", 0.0)))


def legend() -> dict[str, str]:
    """Code -> name, for the shard metadata (JSON keys are strings)."""
    return {str(code): name for code, name in OUTCOMES.items()}


def _short(value, limit: int = 120) -> str:
    """repr of a prompt, response or gold answer for an error message (one line, cut)."""
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    return repr(value)


def score_with_codes(reward_fn, responses: list[str], golds: list,
                     prompts: list[str] | None = None) -> tuple[list[float], list[int]]:
    """Rewards and outcome codes of a list of responses; a missing gold answer, or a reward that
    cannot be computed, stops the job with a :class:`RewardError` naming the prompt (when
    ``prompts`` is given), the response and the gold answer."""
    values, codes = [], []
    for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
        try:
            if is_missing(gold):
                raise RewardError("a prompt has no gold answer (data.answer_field is missing, null or empty)")
            value, code = _normalize(reward_fn(response, str(gold)), "the reward")
        except RewardError as err:
            prompt = f"prompt {_short(prompts[i])}, " if prompts is not None else ""
            raise RewardError(f"{err} ({prompt}response {_short(response)}, gold answer {_short(gold)})") from err
        values.append(value)
        codes.append(code)
    return values, codes


def score(reward_fn, responses: list[str], golds: list) -> list[float]:
    """Rewards of a list of responses; a missing gold answer stops the job."""
    return score_with_codes(reward_fn, responses, golds)[0]
