"""The sampling measure q (DESIGN §2): nucleus, log q, RB entropy, per-token scoring."""
from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from entropy_probe import measure

SETTINGS = [(1.0, 1.0), (1.0, 0.9), (0.7, 0.8), (1.5, 0.5), (0.3, 0.95), (2.0, 0.1)]


def transformers_nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The entries transformers' sampler keeps: Temperature then TopP warper, kept = finite."""
    flat = logits.reshape(-1, logits.shape[-1])
    scores = TemperatureLogitsWarper(temperature)(None, flat.clone())
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.isfinite(scores).reshape(logits.shape)


def mass_before(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float64 probability mass of the strictly more probable tokens, ``[..., V]``."""
    p = torch.softmax(logits.double() / temperature, -1)
    return ((p.unsqueeze(-1) > p.unsqueeze(-2)) * p.unsqueeze(-1)).sum(-2)


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
@pytest.mark.parametrize("shape", [(7, 50), (3, 4, 33), (200,)])
def test_nucleus_matches_transformers_top_p(temperature, top_p, shape):
    g = torch.Generator().manual_seed(hash((temperature, top_p, shape)) % 2**31)
    logits = torch.randn(*shape, generator=g) * 3.0
    ours = measure.nucleus_mask(logits, temperature, top_p)
    theirs = transformers_nucleus(logits, temperature, top_p)
    assert ours.shape == logits.shape and ours.dtype == torch.bool
    # The two rules agree exactly except where a token's preceding mass is within float error of
    # top_p (cumsum order differs); such borderline tokens are vanishingly rare with random logits.
    borderline = (mass_before(logits, temperature) - top_p).abs() < 1e-5
    if top_p >= 1.0:  # nothing is cut: every token is kept by both rules
        borderline[:] = False
        assert ours.all()
    assert torch.equal(ours[~borderline], theirs[~borderline])
    assert borderline.sum() <= 1
    assert ours.any(-1).all()  # never empty
    if top_p < 1.0 and top_p <= 0.5:
        assert not ours.all()  # the test actually truncates


def test_token_that_crosses_top_p_is_kept():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log()
    # mass before: 0, 0.5, 0.8, 0.95
    expected = {
        0.3: [True, False, False, False],
        0.6: [True, True, False, False],  # 0.3 crosses 0.6 and is kept
        0.85: [True, True, True, False],
        0.97: [True, True, True, True],
    }
    for top_p, keep in expected.items():
        assert measure.nucleus_mask(logits, 1.0, top_p).tolist() == keep, top_p
        assert transformers_nucleus(logits, 1.0, top_p).tolist() == keep, top_p
    # the top token is kept even when it alone exceeds top_p
    assert measure.nucleus_mask(torch.tensor([5.0, 0.0, 0.0]), 1.0, 0.01).tolist() == [True, False, False]


def test_temperature_changes_the_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    # colder -> sharper -> smaller nucleus at the same top_p
    assert measure.nucleus_mask(logits, 0.3, 0.9).sum() < measure.nucleus_mask(logits, 3.0, 0.9).sum()


def test_ties_break_by_token_id():
    logits = torch.zeros(2, 4)
    mask = measure.nucleus_mask(logits, 1.0, 0.5)  # mass before: 0, .25, .5, .75
    assert mask.tolist() == [[True, True, False, False]] * 2


def test_top_p_one_keeps_everything():
    logits = torch.randn(5, 3, 17) * 10
    logits[0, 0, 3] = -1e4  # even a token with probability ~0
    assert measure.nucleus_mask(logits, 0.7, 1.0).all()


def test_nucleus_is_not_differentiable():
    logits = torch.randn(4, 9, requires_grad=True)
    assert not measure.nucleus_mask(logits, 1.0, 0.7).requires_grad


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_log_q_is_renormalized_on_the_nucleus(temperature, top_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, 40, generator=g) * 2
    mask = measure.nucleus_mask(logits, temperature, top_p)
    lq = measure.log_q(logits, mask, temperature)
    assert lq.dtype == torch.float32
    assert torch.isneginf(lq[~mask]).all()
    assert torch.isfinite(lq[mask]).all()
    torch.testing.assert_close(lq.double().exp().sum(-1), torch.ones(6, 5, dtype=torch.float64), atol=1e-6, rtol=0)
    # q = p / p(S) with p = softmax(z / τ), in float64
    p = torch.softmax(logits.double() / temperature, -1)
    q = torch.where(mask, p, 0.0) / torch.where(mask, p, 0.0).sum(-1, keepdim=True)
    torch.testing.assert_close(lq.double().exp(), q, atol=1e-6, rtol=1e-5)


def test_q_is_the_model_distribution_at_tau_one_top_p_one():
    logits = torch.randn(3, 11)
    lq = measure.log_q(logits, measure.nucleus_mask(logits, 1.0, 1.0), 1.0)
    torch.testing.assert_close(lq, torch.log_softmax(logits, -1))


def reference_rb_entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """−Σ_{v∈S} q log q computed directly in float64 from q = p / p(S)."""
    p = torch.softmax(logits.double() / temperature, -1)
    p_s = torch.where(mask, p, torch.zeros_like(p))
    q = p_s / p_s.sum(-1, keepdim=True)
    safe = torch.where(mask, q, torch.ones_like(q))
    return -(torch.where(mask, q * safe.log(), torch.zeros_like(q))).sum(-1)


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_rb_entropy_matches_direct_formula(temperature, top_p):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 3, 25, generator=g) * 2.5
    mask = measure.nucleus_mask(logits, temperature, top_p)
    h = measure.rb_entropy(measure.log_q(logits, mask, temperature), mask)
    assert h.shape == (8, 3)
    torch.testing.assert_close(h.double(), reference_rb_entropy(logits, mask, temperature), atol=2e-6, rtol=1e-5)
    assert (h >= -1e-6).all()
    # bounded by log |S|
    assert (h.double() <= mask.sum(-1).double().log() + 1e-5).all()
    single = mask.sum(-1) == 1
    if single.any():
        assert (h[single] == 0).all()


def test_rb_entropy_gradient_is_finite_with_tokens_outside_the_nucleus():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(16, 30, generator=g) * 3
    temperature, top_p = 0.8, 0.6
    mask = measure.nucleus_mask(base, temperature, top_p)
    assert (~mask).any() and (mask.sum(-1) > 1).any()  # some tokens excluded, some rows non-trivial
    logits = base.clone().requires_grad_(True)
    h = measure.rb_entropy(measure.log_q(logits, mask, temperature), mask)
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # S_k held fixed: the excluded logits do not move h
    assert (logits.grad[~mask] == 0).all()
    # and the gradient is the float64 reference's
    ref_logits = base.double().requires_grad_(True)
    reference_rb_entropy(ref_logits, mask, temperature).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8), (1.3, 0.5)])
def test_score_tokens(temperature, top_p):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 7, 20, generator=g) * 2
    tokens = torch.randint(0, 20, (5, 7), generator=g)
    mask = measure.nucleus_mask(logits, temperature, top_p)
    lq = measure.log_q(logits, mask, temperature)
    token_log_q, entropy, in_nucleus = measure.score_tokens(logits, tokens, temperature, top_p)
    assert token_log_q.shape == entropy.shape == in_nucleus.shape == (5, 7)
    assert in_nucleus.dtype == torch.bool
    expected_in = mask.gather(-1, tokens[..., None])[..., 0]
    assert torch.equal(in_nucleus, expected_in)
    if top_p < 1:
        assert (~in_nucleus).any() and in_nucleus.any()
    else:
        assert in_nucleus.all()
    assert torch.isneginf(token_log_q[~in_nucleus]).all()
    torch.testing.assert_close(token_log_q[in_nucleus], lq.gather(-1, tokens[..., None])[..., 0][in_nucleus])
    # direct float64 value of log q(y) for the in-nucleus tokens
    p = torch.softmax(logits.double() / temperature, -1)
    p_s = torch.where(mask, p, 0.0)
    direct = (p_s / p_s.sum(-1, keepdim=True)).gather(-1, tokens[..., None])[..., 0].log()
    torch.testing.assert_close(token_log_q.double()[in_nucleus], direct[in_nucleus], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), reference_rb_entropy(logits, mask, temperature), atol=2e-6, rtol=1e-5)


def test_tempered_token_log_prob_ignores_the_nucleus():
    logits = torch.tensor([[3.0, 0.0, -2.0]])
    tokens = torch.tensor([2])
    got = measure.tempered_token_log_prob(logits, tokens, 0.5)
    expected = math.log(math.exp(-4.0) / (math.exp(6.0) + 1.0 + math.exp(-4.0)))
    assert got.item() == pytest.approx(expected, rel=1e-5)
