"""How a response ends (DESIGN §2): at its first EOS (included), at the token that completes a stop
string (included), or at max_new_tokens; the stopping criteria that end rows during generation,
which never touch the logits (so the sampling measure is the same with or without them)."""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import StoppingCriteria

STOP_EOS, STOP_STRING, STOP_MAX_TOKENS = 0, 1, 2
STOP_REASONS = {STOP_EOS: "eos", STOP_STRING: "stop_string", STOP_MAX_TOKENS: "max_new_tokens"}


def response_lengths(tokens: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """Length up to and including the first EOS (or the full width when none), and whether EOS
    was emitted. Never looks at pad ids: pad and EOS are often the same token."""
    is_eos = tokens == eos_token_id
    stopped = is_eos.any(-1)
    first_eos = torch.where(stopped, is_eos.int().argmax(-1), tokens.shape[-1] - 1)
    return first_eos + 1, stopped


def response_ends(tokens: Tensor, eos_token_id: int, stop_index: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(length T, stopped at EOS, stop reason) per row. T runs up to and including the first EOS
    or the token that completed a stop string (``stop_index``, -1 = none), whichever comes first;
    else the full width (max_new_tokens). An EOS that completes a stop string counts as EOS."""
    lens, at_eos = response_lengths(tokens, eos_token_id)
    reason = torch.where(at_eos, STOP_EOS, STOP_MAX_TOKENS)
    if stop_index is not None:
        stop_index = stop_index.to(tokens.device)
        by_string = (stop_index >= 0) & (~at_eos | (stop_index + 1 < lens))
        lens = torch.where(by_string, stop_index + 1, lens)
        at_eos = at_eos & ~by_string
        reason = torch.where(by_string, STOP_STRING, reason)
    return lens, at_eos, reason.to(torch.int8)


def stop_window(stop_strings) -> int:
    """The response tokens the stop-string check decodes: several times the longest stop string
    in characters, so a string that ends at the newest token lies well inside it."""
    return 2 * max(len(s) for s in stop_strings) + 16


def completes_stop_string(tokenizer, stop_strings, responses: list[list[int]]) -> list[bool]:
    """Whether each response (its tokens so far) contains a stop string in its last
    :func:`stop_window` tokens (decoded with special tokens kept): the check made after every step."""
    window = stop_window(stop_strings)
    texts = tokenizer.batch_decode([r[-window:] for r in responses], skip_special_tokens=False)
    return [any(s in text for s in stop_strings) for text in texts]


class StopStringCriterion(StoppingCriteria):
    """Stops a row once its decoded response contains a stop string, and records the index of the
    response token that completed it (the first step at which the string appears).

    The check decodes the last ``window`` response tokens of each running row (special tokens
    kept, as the rewards see them); ``window`` is several times the longest stop string in
    characters, so the string (which ends at the newest token) lies well inside it."""

    def __init__(self, tokenizer, stop_strings: list[str], prompt_width: int, num_rows: int, eos_token_id: int,
                 prefixes: list[list[int]] | None = None):
        self.tokenizer, self.stop_strings = tokenizer, list(stop_strings)
        self.prompt_width, self.eos_token_id = prompt_width, eos_token_id
        self.window = stop_window(self.stop_strings)
        # a continuation: the response tokens of each row that are already part of its prompt
        self.prefixes = prefixes
        self.stop_index = torch.full((num_rows,), -1, dtype=torch.long)  # -1: no stop string (yet)
        self._ended = torch.zeros(num_rows, dtype=torch.bool)  # stop string found or EOS emitted

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        response = input_ids[:, self.prompt_width:].cpu()
        step = response.shape[1] - 1
        running = (~self._ended).nonzero().squeeze(-1).tolist()
        if running:
            tails = response[running, max(0, step + 1 - self.window):].tolist()
            if self.prefixes is not None:
                tails = [self.prefixes[row] + tail for row, tail in zip(running, tails)]
            for row, found in zip(running, completes_stop_string(self.tokenizer, self.stop_strings, tails)):
                if found:
                    self.stop_index[row] = step
        self._ended |= (self.stop_index >= 0) | (response[:, -1] == self.eos_token_id)
        return (self.stop_index >= 0).to(input_ids.device)


class RowBudget(StoppingCriteria):
    """Stops each row once it has generated its own number of tokens (``budgets`` ``[B]``): the
    continuation of responses that already hold some of their max_new_tokens."""

    def __init__(self, budgets: Tensor, prompt_width: int):
        self.budgets, self.prompt_width = budgets, prompt_width

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        return (input_ids.shape[1] - self.prompt_width >= self.budgets).to(input_ids.device)
