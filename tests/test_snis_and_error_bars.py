"""SNIS ΔH(η) and the calibration of the reported standard error of δH₁."""
from __future__ import annotations

import torch

from entropy_probe import estimators, passes, rewards, rollout, snis, snis_pass

PROMPTS = [{"prompt": p, "answer": a} for p, a in [("3+5=", "8"), ("12+7=", "19"), ("9+9=", "18"), ("0+0=", "0")]]
G = 4


def sample(model, tokenizer, num_prompts, seed, temperature=1.0, top_p=0.9):
    ids = torch.randint(0, len(PROMPTS), (num_prompts,), generator=torch.Generator().manual_seed(seed)).tolist()
    return rollout.rollout_shard(
        model, tokenizer, PROMPTS, ids, G=G, kind="E", shard_index=0, slots=range(len(ids)), seed=seed, temperature=temperature,
        top_p=top_p, max_new_tokens=3, rollout_batch_size=256, gen_batch_size=1024,
        reward_fn=rewards.exact_match,
    )


def random_direction(model, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in model.named_parameters()}


def test_snis_at_eta_zero_is_exactly_zero_with_full_ess(toy_model):
    model, tokenizer = toy_model
    batch = sample(model, tokenizer, 32, seed=1)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    out = snis_pass.snis_pass(model, random_direction(model), batch, [0.0, 0.01], pad_token_id=tokenizer.pad_token_id,
                         temperature=1.0, top_p=0.9, tf_batch_size=50)
    for k, p in model.named_parameters():  # parameters applied functionally, never in place
        assert torch.equal(p, before[k])
    zero = snis.delta_h(out["log_w"][0], out["S_shifted"][0], out["S"], out["T"], out["own_nucleus_differs"][0], G,
                        "token")
    assert zero["delta_h"] == 0.0 and zero["ess"] == out["S"].numel() and zero["own_nucleus_differs_share"] == 0.0
    moved = snis.delta_h(out["log_w"][1], out["S_shifted"][1], out["S"], out["T"], out["own_nucleus_differs"][1], G,
                         "token")
    assert moved["delta_h"] != 0.0 and moved["ess"] < out["S"].numel() and moved["se"] > 0


def test_snis_pass_keeps_the_base_nucleus(toy_model):
    """With top-p < 1, the shifted log-weights use θ's nucleus: a response's log q at θ' is
    finite even when θ''s own nucleus would exclude one of its tokens."""
    model, tokenizer = toy_model
    batch = sample(model, tokenizer, 32, seed=2, top_p=0.8)
    out = snis_pass.snis_pass(model, random_direction(model), batch, [0.5], pad_token_id=tokenizer.pad_token_id,
                         temperature=1.0, top_p=0.8, tf_batch_size=64)
    assert torch.isfinite(out["log_w"]).all()
    assert out["own_nucleus_differs"].any()  # a large step changes some nuclei


def test_reported_se_of_delta_h1_is_calibrated(toy_model):
    """Over independent E batches, the spread of X·v matches the mean reported SE within 25%."""
    model, tokenizer = toy_model
    v = random_direction(model, seed=11)
    estimates, ses = [], []
    for seed in range(80):
        batch = sample(model, tokenizer, 48, seed=100 + seed)
        sums = passes.directional_sums(model, v, batch, pad_token_id=tokenizer.pad_token_id, temperature=1.0,
                                       top_p=0.9, normalization="token", baseline="loo", pathwise_term=True,
                                       tf_batch_size=256)
        estimate, se = estimators.directional_estimate(sums["P"], sums["Q"], sums["S"], sums["T"], G, "token")
        estimates.append(estimate)
        ses.append(se)
    spread = torch.tensor(estimates, dtype=torch.float64).std().item()
    mean_se = sum(ses) / len(ses)
    assert 0.75 < spread / mean_se < 1.25, (spread, mean_se)
