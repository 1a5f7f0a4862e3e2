"""The GRPO objective's registry (entropy_probe.losses): advantages and every loss type's
per-response coefficient, against the formulas of DESIGN §2b written out here."""
from __future__ import annotations

import pytest
import torch

from entropy_probe import losses


def test_group_advantages_values():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    centred = torch.tensor([[0.5, -0.5], [0, 0], [0, 0], [0.5, -0.5]])
    for scale in (False, "none"):
        torch.testing.assert_close(losses.group_advantages(r, scale), centred)
    s = 0.5 / (2 ** -0.5 + 1e-4)  # unbiased std of {0, 1} is 1/sqrt(2)
    for scale in (True, "group"):
        torch.testing.assert_close(losses.group_advantages(r, scale), torch.tensor([[s, -s], [0, 0], [0, 0], [s, -s]]))
    torch.testing.assert_close(losses.group_advantages(r, "batch"), centred / (r.std() + 1e-4))
    r4 = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    std = torch.tensor([1.0, 0, 0, 0]).std().item()
    torch.testing.assert_close(losses.group_advantages(r4, "group"), (r4 - 0.25) / (std + 1e-4))
    for scale in ("none", "group", "batch"):  # G = 1: every advantage is 0, never NaN
        assert torch.equal(losses.group_advantages(torch.tensor([[1.0], [0.0]]), scale), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="update.scale_rewards"):
        losses.group_advantages(r, "sometimes")


def test_informative_groups_counts_groups_with_unequal_rewards():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.5, 0.0]])
    assert losses.informative_groups(r) == 2
    assert losses.informative_groups(torch.zeros(5, 4)) == 0


A = torch.tensor([[0.5, -0.5, 0.0], [1.0, -0.25, -0.75]], dtype=torch.float64)
T = torch.tensor([[3, 1, 2], [4, 4, 1]])
N, TOTAL_T = 6, 15.0


@pytest.mark.parametrize("name,expected", [
    ("grpo", A / T / N), ("seq-mean-token-mean", A / T / N), ("seq_mean_token_mean", A / T / N),
    ("dapo", A / TOTAL_T), ("token-mean", A / TOTAL_T), ("token_mean", A / TOTAL_T),
    ("seq-mean-token-sum", A / N), ("seq_mean_token_sum", A / N),
    ("dr_grpo", A / (N * 7)),
    ("seq-mean-token-sum-norm", A / 40.0),
    ("seq_mean_token_sum_prompt_max_len", A / (2 * 3 * torch.tensor([[3.0], [4.0]]))),
    ("bnpo", A / (3 * torch.tensor([[4.0, 4.0, 6.0], [6.0, 5.0, 5.0]]))),  # micro-batches of 2: T sums 4, 6, 5
])
def test_coefficients_of_every_loss_type(name, expected):
    settings = losses.LossSettings(max_completion_length=7, loss_scale_factor=40.0, micro_batch_size=2)
    torch.testing.assert_close(losses.response_coefficients(name, A, T, settings), expected)


def test_loss_settings_are_required_where_the_trainer_needs_them():
    for name, key in (("dr_grpo", "max_completion_length"), ("bnpo", "micro_batch_size"),
                      ("seq-mean-token-sum-norm", "loss_scale_factor")):
        with pytest.raises(ValueError, match=f"update.{key}"):
            losses.response_coefficients(name, A, T)
    with pytest.raises(ValueError, match="update.loss_type: unknown loss type 'seq_mean_token_sum_max_len'"):
        losses.resolve("seq_mean_token_sum_max_len")
