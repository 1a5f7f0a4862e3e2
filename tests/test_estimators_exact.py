"""The estimators against exact enumeration on the tiny policy (DESIGN §2 "Ground truth").

One large E batch per sampling setting (prompts uniform over a handful, with replacement); X·u
along fixed random directions u must match the exact ∇H·u within 4 standard errors, for τ = 1
and τ ≠ 1, top-p = 1 and < 1, both normalizations and both baselines.
"""
from __future__ import annotations

import pytest
import torch

from entropy_probe import estimators, exact_terms, gradients, losses, parameters, passes, rollout, rewards, teacher_force, tf_layout
from entropy_probe.stages import inputs as stage_inputs

from entropy_probe import exact

PROMPTS = [{"prompt": p, "answer": a} for p, a in [("3+5=", "8"), ("12+7=", "19"), ("9+9=", "18"), ("0+0=", "0")]]
MAX_NEW_TOKENS = 3
G = 4
NUM_PROMPTS = 256  # E batch: 1024 sequences
SETTINGS = [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8), (0.7, 0.8)]
ESTIMATORS = [("token", "loo"), ("token", "none"), ("sequence", "loo"), ("sequence", "none")]


def sample_batch(model, tokenizer, temperature, top_p, num_prompts=NUM_PROMPTS, seed=0):
    ids = torch.randint(0, len(PROMPTS), (num_prompts,), generator=torch.Generator().manual_seed(seed)).tolist()
    return rollout.rollout_shard(
        model, tokenizer, PROMPTS, ids, G=G, kind="E", shard_index=0, slots=range(len(ids)), seed=seed, temperature=temperature,
        top_p=top_p, max_new_tokens=MAX_NEW_TOKENS, rollout_batch_size=256, gen_batch_size=1024,
        reward_fn=rewards.exact_match,
    )


def directions(model, count=1):
    gen = torch.Generator().manual_seed(123)
    return [{k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in model.named_parameters()}
            for _ in range(count)]


def x_dot(grads, u, denom):
    return float(sum((grads[k] * u[k]).sum() for k in grads)) / denom


@pytest.fixture(scope="module")
def batches(toy_model):
    model, tokenizer = toy_model
    return {s: sample_batch(model, tokenizer, *s) for s in SETTINGS}


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_x_estimator_is_unbiased_against_exact_gradient(toy_model, batches, temperature, top_p):
    model, tokenizer = toy_model
    batch = batches[(temperature, top_p)]
    stats = stage_inputs.e_batch_stats([batch])
    params = parameters.select(model)
    prompts = [p["prompt"] for p in PROMPTS]
    us = directions(model)
    for normalization in ("token", "sequence"):
        exact_grad = exact.exact_entropy_grad(model, tokenizer, prompts, temperature=temperature, top_p=top_p,
                                              max_new_tokens=MAX_NEW_TOKENS, normalization=normalization)
        denom = stats["sum_T"] if normalization == "token" else stats["num_sequences"]
        for baseline in ("loo", "none"):
            grads, _ = passes.x_gradient(
                model, params, batch, pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p,
                H_bar=stats["H_bar_token"], normalization=normalization, baseline=baseline, pathwise_term=True,
                tf_batch_size=512)
            for u in us:
                sums = passes.directional_sums(
                    model, u, batch, pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p,
                    normalization=normalization, baseline=baseline, pathwise_term=True, tf_batch_size=512)
                forward, se = estimators.directional_estimate(sums["P"], sums["Q"], sums["S"], sums["T"], G,
                                                              normalization)
                estimate = x_dot(grads, u, denom)
                truth = float(sum((exact_grad[k].double() * u[k]).sum() for k in exact_grad))
                # reverse and forward mode agree on the same batch
                assert forward == pytest.approx(estimate, rel=1e-4, abs=1e-6)
                z = (estimate - truth) / se
                assert abs(z) < 4, (normalization, baseline, estimate, truth, se)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_loo_baseline_cuts_the_variance_of_x_dot_v(toy_model, batches, temperature, top_p):
    """Along the update direction (the exact expected GRPO gradient), with the default `token`
    normalization, the leave-one-out baseline gives a smaller standard error than none.
    (On this toy with G = 4 it does not help the `sequence` normalization along random
    directions: the entropy-to-go depends mostly on the sampled prefix, not on the prompt.)"""
    model, tokenizer = toy_model
    batch = batches[(temperature, top_p)]
    v = exact_terms.exact_grpo_gradient(model, tokenizer, [p["prompt"] for p in PROMPTS], [p["answer"] for p in PROMPTS],
                                  temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW_TOKENS, G=G)
    ses = {}
    for baseline in ("none", "loo"):
        sums = passes.directional_sums(
            model, v, batch, pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p,
            normalization="token", baseline=baseline, pathwise_term=True, tf_batch_size=512)
        ses[baseline] = estimators.directional_estimate(sums["P"], sums["Q"], sums["S"], sums["T"], G, "token")[1]
    assert ses["loo"] < ses["none"], ses


def _slice_groups(batch: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in batch.items()}


def test_x_does_not_depend_on_the_sharding(toy_model, batches):
    """The same E batch cut into 1 or 4 shards gives the same X (whole-batch H̄)."""
    model, tokenizer = toy_model
    batch = batches[(0.7, 0.8)]
    stats = stage_inputs.e_batch_stats([batch])
    params = parameters.select(model)
    kwargs = dict(pad_token_id=tokenizer.pad_token_id, temperature=0.7, top_p=0.8, H_bar=stats["H_bar_token"],
                  normalization="token", baseline="loo", pathwise_term=True, tf_batch_size=100)
    whole, _ = passes.x_gradient(model, params, batch, **kwargs)
    bounds = [0, 60, 130, 200, NUM_PROMPTS]
    parts = [passes.x_gradient(model, params, _slice_groups(batch, lo, hi), **kwargs)[0]
             for lo, hi in zip(bounds, bounds[1:])]
    for name in whole:
        total = sum(p[name] for p in parts)
        # float32 accumulation inside each backward: agreement to float32 tolerance
        torch.testing.assert_close(total, whole[name], rtol=1e-4, atol=1e-5 * whole[name].abs().max().item())


def test_pathwise_term_false_drops_the_pathwise_term(toy_model, batches):
    model, tokenizer = toy_model
    batch = _slice_groups(batches[(1.0, 1.0)], 0, 32)
    stats = stage_inputs.e_batch_stats([batch])
    params = parameters.select(model)
    kwargs = dict(pad_token_id=tokenizer.pad_token_id, temperature=1.0, top_p=1.0, H_bar=stats["H_bar_token"],
                  normalization="token", baseline="loo", tf_batch_size=64)
    with_rb, _ = passes.x_gradient(model, params, batch, pathwise_term=True, **kwargs)
    without, _ = passes.x_gradient(model, params, batch, pathwise_term=False, **kwargs)
    # score term only: weights zeroed out entirely would give no gradient, the pathwise term alone
    # is the difference
    diff = sum(float((with_rb[k] - without[k]).abs().sum()) for k in with_rb)
    assert diff > 1e-3
    # the pathwise term alone is ∇ Σ h: check it against autograd on the same batch
    tb = tf_layout.from_rollout(batch, tokenizer.pad_token_id)
    for p in params.values():
        p.grad = None
    scores = teacher_force.score(teacher_force.ResponseLogits(model), tb, 1.0, 1.0)
    scores.entropy.sum().backward()
    for k, p in params.items():
        torch.testing.assert_close((with_rb[k] - without[k]).float(), p.grad, rtol=1e-3,
                                   atol=1e-4 * max(p.grad.abs().max().item(), 1.0))
        p.grad = None


def test_y_estimator_is_unbiased_against_exact_grpo_gradient(toy_model):
    """Y (seq_mean_token_mean) over many prompt groups matches the exact E[Y] along E[Y] itself
    (where the signal is largest) within 4 SE (SE from the per-group contributions)."""
    model, tokenizer = toy_model
    temperature, top_p, num_groups = 0.7, 0.8, 96
    batch = sample_batch(model, tokenizer, temperature, top_p, num_prompts=num_groups, seed=5)
    params = parameters.select(model)
    expected_y = exact_terms.exact_grpo_gradient(
        model, tokenizer, [p["prompt"] for p in PROMPTS], [p["answer"] for p in PROMPTS], temperature=temperature,
        top_p=top_p, max_new_tokens=MAX_NEW_TOKENS, G=G)
    u = {k: g.double() for k, g in expected_y.items()}
    advantages = losses.group_advantages(batch["rewards"], "none")
    numerators, terms = losses.response_weights("grpo", advantages, batch["response_lens"])
    per_group = []
    for g in range(num_groups):
        grads = passes.y_gradient(model, params, _slice_groups(batch, g, g + 1), numerators[g:g + 1],
                                  pad_token_id=tokenizer.pad_token_id, temperature=temperature, tf_batch_size=G)
        per_group.append(x_dot(grads, u, float(terms[g].sum())))
    per_group = torch.tensor(per_group, dtype=torch.float64)
    whole = passes.y_gradient(model, params, batch, numerators, pad_token_id=tokenizer.pad_token_id,
                              temperature=temperature, tf_batch_size=512)
    estimate = x_dot(whole, u, float(terms.sum()))
    assert estimate == pytest.approx(float(per_group.mean()), rel=1e-4)
    se = float(per_group.std() / num_groups**0.5)
    truth = gradients.dot(gradients.restrict(expected_y, u), u)
    assert abs(estimate - truth) < 4 * se, (estimate, truth, se)
    assert se < abs(truth)  # the test has power: the signal is resolved
