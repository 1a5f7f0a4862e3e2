"""Rewards (entropy_probe.rewards): every reward on right, wrong, malformed and missing-gold inputs,
with the outcome code that says why a response was not rewarded."""
from __future__ import annotations

import math

import pytest

from entropy_probe import rewards
from entropy_probe.rewards import BAD_FORMAT, NO_ANSWER, PASS, WRONG_ANSWER, ZERO_UNSPECIFIED, RewardError

MISSING = [None, "", "   ", float("nan")]


def _one(fn, response, gold):
    values, codes = rewards.score_with_codes(fn, [response], [gold])
    return values[0], codes[0]


# ------------------------------------------------------------------------------------ exact_match


@pytest.mark.parametrize("response,gold,expected", [
    ("42", "42", (1.0, PASS)),
    (" 42\n", "42 ", (1.0, PASS)),  # stripped on both sides
    ("41", "42", (0.0, WRONG_ANSWER)),
    ("42<pad>", "42", (0.0, WRONG_ANSWER)),  # a sampled pad is a real token, not the answer
    ("", "42", (0.0, NO_ANSWER)),  # malformed: nothing to compare
    ("  ", "42", (0.0, NO_ANSWER)),
])
def test_exact_match(response, gold, expected):
    assert _one(rewards.get_reward("exact_match"), response, gold) == expected
    assert rewards.exact_match(response, gold) == expected[0]  # the plain float function


# ------------------------------------------------------------------------------------------ math


@pytest.mark.parametrize("response,gold,expected", [
    ("72", "72", (1.0, PASS)),  # plain numbers
    ("so the total is \\boxed{72}.", "72", (1.0, PASS)),  # \boxed{}
    ("First 70, then 72.\n#### 72", "72", (1.0, PASS)),  # GSM8K style: the last number
    ("The answer is $\\frac{1}{2}$", "0.5", (1.0, PASS)),  # LaTeX against a decimal
    ("\\boxed{0.5}", "\\frac{1}{2}", (1.0, PASS)),  # LaTeX gold
    ("\\boxed{1000}", "1,000", (1.0, PASS)),
    ("\\boxed{71}", "72", (0.0, WRONG_ANSWER)),
    ("I think it is 73", "72", (0.0, WRONG_ANSWER)),
    ("no idea", "72", (0.0, NO_ANSWER)),  # malformed: no answer at all
    ("\\boxed{", "72", (0.0, NO_ANSWER)),
    ("", "72", (0.0, NO_ANSWER)),
])
def test_math(response, gold, expected):
    assert _one(rewards.get_reward("math"), response, gold) == expected


def test_math_unparsable_gold_is_an_error_not_a_zero():
    with pytest.raises(RewardError, match="cannot be parsed"):
        _one(rewards.get_reward("math"), "\\boxed{3}", "???")


# ----------------------------------------------------------------------------- think_answer_math

GOOD = "<think>3 + 4 = 7</think>\n<answer>\\boxed{7}</answer>"


@pytest.mark.parametrize("response,weight,expected", [
    (GOOD, 0.0, (1.0, PASS)),
    ("  <think>\nadd them\n</think> <answer>7</answer>\n", 0.0, (1.0, PASS)),  # whitespace around blocks
    (GOOD, 0.5, (1.5, PASS)),  # correct + format_weight
    ("<think>hmm</think><answer>8</answer>", 0.0, (0.0, WRONG_ANSWER)),
    ("<think>hmm</think><answer>8</answer>", 0.5, (0.5, WRONG_ANSWER)),  # format reward only
    ("<think>hmm</think><answer>no idea</answer>", 0.0, (0.0, NO_ANSWER)),
    ("<think>hmm</think><answer></answer>", 0.25, (0.25, NO_ANSWER)),
    ("\\boxed{7}", 0.5, (0.0, BAD_FORMAT)),  # right answer, wrong format: nothing
    ("<think>3+4</think>7", 0.5, (0.0, BAD_FORMAT)),  # malformed: no <answer>
    ("<answer>7</answer>", 0.5, (0.0, BAD_FORMAT)),  # no <think>
    ("<think>a</think><answer>7</answer> and more", 0.5, (0.0, BAD_FORMAT)),  # trailing text
    ("<think>a</think><answer>7</answer><answer>7</answer>", 0.5, (0.0, BAD_FORMAT)),
    ("<think>a<think>b</think><answer>7</answer>", 0.5, (0.0, BAD_FORMAT)),
])
def test_think_answer_math(response, weight, expected):
    value, code = _one(rewards.get_reward("think_answer_math", format_weight=weight), response, "7")
    assert (value, code) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------- custom

USER_MODULE = '''
def length_bonus(response, gold):
    return 0.1 * len(response) if gold in response else 0.0

def with_reason(response, gold):
    if "?" in response:
        return 0.0, "no_answer"
    return (1.0, "pass") if response.strip() == gold else (0.0, "wrong_answer")

def bad_reason(response, gold):
    return 0.0, "because"

def not_a_number(response, gold):
    return "yes"

def nan(response, gold):
    return float("nan")

def raises(response, gold):
    return {"7": 1.0}[response]
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    return path


def test_custom_from_module_and_file(user_module):
    by_module = rewards.get_reward("custom", "my_rewards:length_bonus")
    by_path = rewards.get_reward("custom", f"{user_module}:length_bonus")
    for fn in (by_module, by_path):
        assert _one(fn, "so 42", "42") == (pytest.approx(0.5), PASS)  # right
        assert _one(fn, "so 41", "42") == (0.0, ZERO_UNSPECIFIED)  # wrong, without a reason
        assert _one(fn, "", "42") == (0.0, ZERO_UNSPECIFIED)  # malformed


def test_custom_reasons(user_module):
    fn = rewards.get_reward("custom", "my_rewards:with_reason")
    assert _one(fn, "42", "42") == (1.0, PASS)
    assert _one(fn, "41", "42") == (0.0, WRONG_ANSWER)
    assert _one(fn, "??", "42") == (0.0, NO_ANSWER)
    for name, match in [("bad_reason", "reason 'because'"), ("not_a_number", "not a number"), ("nan", "non-finite")]:
        with pytest.raises(RewardError, match=match):
            _one(rewards.get_reward("custom", f"my_rewards:{name}"), "42", "42")


def test_custom_that_raises_names_the_function_prompt_and_response(user_module):
    fn = rewards.get_reward("custom", "my_rewards:raises")
    assert _one(fn, "7", "7") == (1.0, PASS)
    with pytest.raises(RewardError) as info:
        rewards.score_with_codes(fn, ["7", "8\n9"], ["7", "7"], prompts=["3+4=", "3+4="])
    assert str(info.value) == ("reward.function 'my_rewards:raises' raised KeyError: '8\\n9' "
                               "(prompt '3+4=', response '8\\n9', gold answer '7')")


@pytest.mark.parametrize("spec,match", [
    ("my_rewards", "not 'module:function'"),
    ("no_such_module_xyz:f", "cannot import"),
    ("my_rewards:missing", "no callable"),
    ("/nonexistent/r.py:f", "does not exist"),
])
def test_custom_bad_specs(user_module, spec, match):
    with pytest.raises(RewardError, match=match):
        rewards.get_reward("custom", spec)


# ----------------------------------------------------------------------------------- missing gold


@pytest.mark.parametrize("name", ["exact_match", "math", "think_answer_math", "custom"])
@pytest.mark.parametrize("gold", MISSING, ids=["None", "empty", "blank", "nan"])
def test_missing_gold_is_an_error(user_module, name, gold):
    fn = rewards.get_reward(name, "my_rewards:with_reason" if name == "custom" else "")
    with pytest.raises(RewardError, match="no gold answer"):
        rewards.score_with_codes(fn, ["42", GOOD], ["42", gold])


def test_legend_and_config():
    assert rewards.legend() == {"0": "pass", "1": "wrong_answer", "2": "no_answer", "3": "bad_format",
                                "4": "zero_unspecified"}
    fn = rewards.from_config({"name": "think_answer_math", "function": "", "format_weight": 0.25})
    assert _one(fn, "<think>x</think><answer>7</answer>", "7") == (1.25, PASS)
    assert math.isclose(rewards.score(rewards.exact_match, ["1", "2"], ["1", "1"])[0], 1.0)
    with pytest.raises(RewardError, match="unknown reward"):
        rewards.get_reward("bleu")
