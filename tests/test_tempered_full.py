"""estimator.entropy: tempered_full — the full-vocabulary entropy of softmax(z/τ) at each sampled
prefix, what TRL and verl log (DESIGN §2b "Which entropy"), with responses still drawn from q.

Its closed-form logit gradient matches autograd; the sampling-time values match teacher forcing;
X·u, the SNIS ΔH (θ's nucleus) and the fresh-rollout ΔH (own nucleus) match exact enumeration of
the full entropy within 4 SE with top_p < 1 (where the two entropies differ); and with top_p = 1
every stage gives identical numbers for the two choices.
"""
from __future__ import annotations

import pytest
import torch

from toy_batches import G, MAX_NEW_TOKENS, PROMPTS, direction, sample_batch

from entropy_probe.stages import inputs as stage_inputs
from entropy_probe import (entropies, estimators, exact, fresh, fresh_pass, gradients, logit_gradient, measure,
                           parameters, passes, snis, snis_pass, teacher_force,
                           tf_layout)

SETTINGS = [(1.0, 0.8), (0.7, 0.8)]  # top_p < 1: the two entropies differ
ETAS = [3e-3, 1e-2]


def exact_kwargs(temperature, top_p, normalization="token", entropy="tempered_full"):
    return dict(temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW_TOKENS, normalization=normalization,
                entropy=entropy)


def exact_delta(model, tokenizer, u, eta, temperature, top_p, nucleus, entropy="tempered_full"):
    prompts = [p["prompt"] for p in PROMPTS]
    kw = exact_kwargs(temperature, top_p, entropy=entropy) | {"direction": u, "nucleus": nucleus}
    return (exact.exact_entropy_at(model, tokenizer, prompts, eta=eta, **kw)
            - exact.exact_entropy_at(model, tokenizer, prompts, eta=0.0, **kw))


@pytest.fixture(scope="module")
def batches(toy_model):
    model, tokenizer = toy_model
    return {s: sample_batch(model, tokenizer, *s) for s in SETTINGS}


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8), (0.7, 0.6)])
def test_closed_form_logit_gradient_of_the_full_entropy(temperature, top_p):
    """logit_gradient.scores_with_logit_gradient(entropy="tempered_full"): h = −Σ_V p log p and
    ∂h/∂z_v = −p_v (log p_v + h)/τ, with the log q and log p terms beside it, against autograd."""
    gen = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(64, 50, generator=gen)
    y = torch.multinomial(measure.nucleus_mask(z, temperature, top_p).float(), 1, generator=gen).squeeze(-1)
    coefs = [torch.randn(64, generator=gen) for _ in range(3)]
    for chosen in [(0,), (0, 1), (1,), (0, 1, 2), (0, 2)]:
        c = [coefs[i] if i in chosen else None for i in range(3)]
        leaf = z.clone().requires_grad_(True)
        token_log_q, h, _ = measure.score_tokens(leaf, y, temperature, top_p, entropy="tempered_full")
        p = torch.softmax(leaf.double() / temperature, -1)
        torch.testing.assert_close(h.double(), -(p * p.log()).sum(-1), atol=1e-5, rtol=0)
        log_p = measure.tempered_token_log_prob(leaf, y, temperature)
        F = sum((ci * x).sum() for ci, x in zip(c, (h, token_log_q, log_p)) if ci is not None)
        (grad,) = torch.autograd.grad(F, leaf)
        scores, closed = logit_gradient.scores_with_logit_gradient(
            z.clone(), y, temperature, top_p, want_tempered=c[2] is not None, coef_entropy=c[0], coef_log_q=c[1],
            coef_tempered=c[2], entropy="tempered_full")
        torch.testing.assert_close(closed, grad, atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(scores["entropy"], h.detach(), atol=2e-6, rtol=0)
        torch.testing.assert_close(scores["token_log_q"], token_log_q.detach(), atol=2e-6, rtol=0)


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_sampling_time_full_entropy_is_the_teacher_forced_one(toy_model, batches, temperature, top_p):
    model, tokenizer = toy_model
    batch = {k: v[:32] for k, v in batches[(temperature, top_p)].items()}
    layout = tf_layout.from_rollout(batch, tokenizer.pad_token_id)
    scores = teacher_force.score(teacher_force.ResponseLogits(model), layout, temperature, top_p,
                                 entropy="tempered_full")
    B, G_, T = batch["tempered_entropies"].shape
    torch.testing.assert_close(scores.entropy, batch["tempered_entropies"].reshape(B * G_, T), atol=1e-5, rtol=0)
    # with top_p < 1 the full entropy exceeds the nucleus one wherever the nucleus drops tokens
    assert (batch["tempered_entropies"] > batch["rb_entropies"] + 1e-4).any()


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_x_estimator_of_the_full_entropy_is_unbiased(toy_model, batches, temperature, top_p):
    """X·u with entropy="tempered_full" (reverse and forward mode) against the exact ∇H·u of the
    full entropy, within 4 SE, both normalizations; the exact gradients of the two entropies
    differ by more than that (the test has power)."""
    model, tokenizer = toy_model
    batch = batches[(temperature, top_p)]
    stats = stage_inputs.e_batch_stats([batch], "tempered_full")
    params = parameters.select(model)
    prompts = [p["prompt"] for p in PROMPTS]
    [u] = [direction(model)]
    differ = []
    for normalization in ("token", "sequence"):
        grads = {e: exact.exact_entropy_grad(model, tokenizer, prompts,
                                             **exact_kwargs(temperature, top_p, normalization, e))
                 for e in ("tempered_full", "sampler")}
        truth = {e: gradients.dot(gradients.restrict(g, u), u) for e, g in grads.items()}
        X, _ = passes.x_gradient(model, params, batch, pad_token_id=tokenizer.pad_token_id, temperature=temperature,
                                 top_p=top_p, H_bar=stats["H_bar_token"], normalization=normalization, baseline="loo",
                                 pathwise_term=True, tf_batch_size=1024, entropy="tempered_full")
        denom = stats["sum_T"] if normalization == "token" else stats["num_sequences"]
        estimate = gradients.dot(gradients.restrict(X, u), u) / denom
        sums = passes.directional_sums(model, u, batch, pad_token_id=tokenizer.pad_token_id, temperature=temperature,
                                       top_p=top_p, normalization=normalization, baseline="loo", pathwise_term=True,
                                       tf_batch_size=1024, entropy="tempered_full")
        forward, se = estimators.directional_estimate(sums["P"], sums["Q"], sums["S"], sums["T"], G, normalization)
        assert forward == pytest.approx(estimate, rel=1e-4, abs=1e-6)
        assert abs(estimate - truth["tempered_full"]) < 4 * se, (normalization, estimate, truth, se)
        differ.append(abs(truth["tempered_full"] - truth["sampler"]) > 4 * se)
    assert any(differ)


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_snis_and_fresh_rollouts_of_the_full_entropy_match_exact(toy_model, batches, temperature, top_p):
    """SNIS ΔH (θ's nucleus) against the exact frozen-nucleus ΔH of the full entropy, the fresh
    rollouts' ΔH_sampler against the exact own-nucleus one, within 4 SE each."""
    model, tokenizer = toy_model
    batch = batches[(temperature, top_p)]
    u = direction(model)
    out = snis_pass.snis_pass(model, u, batch, ETAS, pad_token_id=tokenizer.pad_token_id, temperature=temperature,
                         top_p=top_p, tf_batch_size=1024)
    S_field, S_shifted_field = entropies.get("tempered_full").snis_fields
    torch.testing.assert_close(out[S_field].float(), batch["tempered_entropies"].sum(-1).reshape(-1), atol=1e-4,
                               rtol=0)
    power = []
    for j, eta in enumerate(ETAS):
        row = snis.delta_h(out["log_w"][j], out[S_shifted_field][j], out[S_field], out["T"],
                           out["own_nucleus_differs"][j], G, "token")
        truth = exact_delta(model, tokenizer, u, eta, temperature, top_p, "base")
        assert abs(row["delta_h"] - truth) < 4 * row["se"], (eta, row["delta_h"], truth, row["se"])
        other = exact_delta(model, tokenizer, u, eta, temperature, top_p, "base", entropy="sampler")
        power.append(abs(truth - other) > 4 * row["se"])
        redrawn = fresh_pass.fresh_rollout_shard(model, tokenizer, batch, u, eta, slots=range(len(batch["prompt_ids"])),
                                            seed=0, temperature=temperature, top_p=top_p,
                                            max_new_tokens=MAX_NEW_TOKENS, gen_batch_size=4096)[0]
        row = fresh.delta_h_sampler(**fresh.per_response(redrawn, "tempered_full"), G=G, normalization="token")
        truth = exact_delta(model, tokenizer, u, eta, temperature, top_p, "own")
        assert abs(row["delta_h"] - truth) < 4 * row["se"], (eta, row["delta_h"], truth, row["se"])
        other = exact_delta(model, tokenizer, u, eta, temperature, top_p, "own", entropy="sampler")
        power.append(abs(truth - other) > 4 * row["se"])
    assert any(power)  # the full entropy's change is not the sampler entropy's: the test tells them apart


def test_top_p_one_gives_identical_numbers(toy_model):
    """With top_p = 1 the two entropies are one number: every stage's output is bit for bit the
    same for both choices (sampling time, plug-ins, X, the directional pass, SNIS, the fresh
    rollouts, the exact reference)."""
    model, tokenizer = toy_model
    temperature, top_p = 0.7, 1.0
    batch = sample_batch(model, tokenizer, temperature, top_p, num_prompts=24, seed=3)
    assert torch.equal(batch["tempered_entropies"], batch["rb_entropies"])
    stats = {e: stage_inputs.e_batch_stats([batch], e) for e in entropies.ENTROPY_KINDS}
    assert stats["sampler"]["H_bar_token"] == stats["tempered_full"]["H_bar_token"]
    params = parameters.select(model)
    u = direction(model)
    common = dict(pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p, normalization="token",
                  baseline="loo", pathwise_term=True, tf_batch_size=64)
    X = {e: passes.x_gradient(model, params, batch, H_bar=stats[e]["H_bar_token"], entropy=e, **common)
         for e in entropies.ENTROPY_KINDS}
    for name in params:
        assert torch.equal(X["sampler"][0][name], X["tempered_full"][0][name]), name
    assert torch.equal(X["sampler"][1]["S"], X["tempered_full"][1]["S"])
    sums = {e: passes.directional_sums(model, u, batch, entropy=e, **common) for e in entropies.ENTROPY_KINDS}
    assert all(torch.equal(sums["sampler"][k], sums["tempered_full"][k]) for k in sums["sampler"])
    out = snis_pass.snis_pass(model, u, batch, ETAS, pad_token_id=tokenizer.pad_token_id, temperature=temperature,
                         top_p=top_p, tf_batch_size=64)
    for a, b in zip(entropies.get("sampler").snis_fields, entropies.get("tempered_full").snis_fields):
        assert torch.equal(out[a], out[b])
    redrawn = fresh_pass.fresh_rollout_shard(model, tokenizer, batch, u, ETAS[0], slots=range(24), seed=3,
                                        temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW_TOKENS,
                                        gen_batch_size=64)[0]
    rows = {e: fresh.delta_h_sampler(**fresh.per_response(redrawn, e), G=G, normalization="token")
            for e in entropies.ENTROPY_KINDS}
    assert rows["sampler"] == rows["tempered_full"]
    prompts = [p["prompt"] for p in PROMPTS]
    values = {e: exact.exact_entropy_and_grad(model, tokenizer, prompts, **exact_kwargs(temperature, top_p, entropy=e))
              for e in entropies.ENTROPY_KINDS}
    assert values["sampler"][0] == values["tempered_full"][0]
    assert all(torch.equal(values["sampler"][1][k], values["tempered_full"][1][k]) for k in values["sampler"][1])
    for nucleus in ("base", "own"):
        assert (exact_delta(model, tokenizer, u, ETAS[0], temperature, top_p, nucleus, "sampler")
                == exact_delta(model, tokenizer, u, ETAS[0], temperature, top_p, nucleus, "tempered_full"))
