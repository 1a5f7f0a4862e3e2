"""Rewards: map (response text, gold answer) to a float. Missing gold answers are errors."""
from __future__ import annotations


def exact_match(response: str, gold: str) -> float:
    """1.0 when the stripped response equals the stripped gold answer, else 0.0."""
    return float(response.strip() == gold.strip())


REWARDS = {"exact_match": exact_match}


def get_reward(name: str):
    if name not in REWARDS:
        raise ValueError(f"reward.name: unknown reward {name!r} (known: {sorted(REWARDS)})")
    return REWARDS[name]


def score(reward_fn, responses: list[str], golds: list[str | None]) -> list[float]:
    """Rewards of a list of responses; a missing gold answer stops the job."""
    out = []
    for response, gold in zip(responses, golds, strict=True):
        if gold is None:
            raise ValueError("a prompt has no gold answer (data.answer_field is missing or null)")
        out.append(float(reward_fn(response, str(gold))))
    return out
