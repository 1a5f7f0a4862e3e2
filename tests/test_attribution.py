"""Attribution of δH₁: exact additive splits of X·v over E tokens and U tokens, their
agreement with the influence contributions that make the error bars and with exact enumeration,
the U-batch noise of δH₁, and the covariance view on a tabular softmax bandit."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from entropy_probe import (attribution, covariance, estimators, exact_terms, losses, normalization, parameters,
                           passes, rewards, rollout, update)
from entropy_probe.stages import inputs as stage_inputs
from entropy_probe.optimizer_state import load_adamw_state
from entropy_probe.input_files import NAMES_FILE, STATE_FILE

PROMPTS = [{"prompt": p, "answer": a} for p, a in [("3+5=", "8"), ("12+7=", "19"), ("9+9=", "18"), ("0+0=", "0")]]
G = 4
MAX_NEW_TOKENS = 3


def sample(model, tokenizer, num_prompts, seed, temperature=1.0, top_p=0.9, kind="E", examples=PROMPTS,
           prompt_ids=None):
    ids = prompt_ids if prompt_ids is not None else torch.randint(
        0, len(examples), (num_prompts,), generator=torch.Generator().manual_seed(seed)).tolist()
    return rollout.rollout_shard(
        model, tokenizer, examples, ids, G=G, kind=kind, shard_index=0, slots=range(len(ids)), seed=seed,
        temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW_TOKENS, rollout_batch_size=4096,
        gen_batch_size=4096, reward_fn=rewards.exact_match)


def random_direction(model, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in model.named_parameters()}


def e_tokens(model, tokenizer, batch, direction, normalization, baseline, top_p=0.9):
    return passes.directional_tokens(
        model, direction, batch, pad_token_id=tokenizer.pad_token_id, temperature=1.0, top_p=top_p,
        normalization=normalization, baseline=baseline, pathwise_term=True, tf_batch_size=512)


def e_shares(tokens, batch, normalization):
    return attribution.e_token_shares(tokens["d_entropy"], tokens["d_log_q"], tokens["weight_a"],
                                      tokens["weight_beta"], tokens["entropy"], batch["response_lens"].reshape(-1),
                                      normalization)


@pytest.fixture(scope="module")
def small_batch(toy_model):
    model, tokenizer = toy_model
    return sample(model, tokenizer, 48, seed=3)


@pytest.mark.parametrize("normalization", ["token", "sequence"])
@pytest.mark.parametrize("baseline", ["loo", "none"])
def test_e_token_shares_sum_to_x_dot_v_and_to_the_influence_contributions(toy_model, small_batch, normalization,
                                                                          baseline):
    model, tokenizer = toy_model
    u = random_direction(model)
    tokens = e_tokens(model, tokenizer, small_batch, u, normalization, baseline)
    sums = passes.sums_of_tokens(tokens, small_batch["response_lens"])
    estimate, influence = estimators.directional_contributions(sums["P"], sums["Q"], sums["S"], sums["T"], G,
                                                               normalization)
    shares = e_shares(tokens, small_batch, normalization)
    share = shares["share"]
    assert float(share.sum()) == pytest.approx(estimate, rel=1e-10, abs=1e-12)
    assert shares["X_dot_v"] == pytest.approx(estimate, rel=1e-12)
    torch.testing.assert_close(shares["pathwise"] + shares["score"] + shares["plugin"], share)
    torch.testing.assert_close(shares["pathwise"] + shares["score"], shares["direct"])
    assert float(shares["direct"].sum()) == pytest.approx(estimate, rel=1e-10, abs=1e-12)
    assert float(shares["plugin"].sum()) == pytest.approx(0.0, abs=1e-12 * max(1.0, abs(estimate)))
    # the tokens of each prompt group sum to its influence contribution (X·v + ψ_g)/n: the units of the SE
    n = influence.numel()
    per_group = share.reshape(n, -1).sum(-1)
    torch.testing.assert_close(per_group, (estimate + influence) / n, rtol=1e-9, atol=1e-12)
    # each response's tokens sum to its total, computed here from the per-response sums
    lengths = small_batch["response_lens"].reshape(-1).double()
    D_i = normalization_denominators(lengths, normalization)
    P_i = (tokens["d_entropy"] + tokens["weight_a"] * tokens["d_log_q"]).sum(-1)
    Q_i = (tokens["weight_beta"] * tokens["d_log_q"]).sum(-1)
    S_i = tokens["entropy"].sum(-1)
    D, N = float(D_i.sum()), lengths.numel()
    H = float(S_i.sum()) / D
    Q = float(Q_i.sum())
    response_total = (P_i - H * Q_i - Q / D * (S_i - H * D_i) + estimate * (D / N - D_i)) / D
    torch.testing.assert_close(share.sum(-1), response_total, rtol=1e-9, atol=1e-12)
    if normalization == "sequence":  # no plug-in terms
        assert float(shares["plugin"].abs().max()) == 0.0


def normalization_denominators(lengths, name):
    return normalization.get(name).denominators(lengths)


def test_per_prompt_contributions_match_exact_enumeration(toy_model):
    """Over a large E batch (1024 sequences on 4 prompts), the mean influence contribution of the
    groups of each prompt matches that prompt's exact term φ_x of ∇H·v (exact_terms.py), within 4 SE,
    along the exact expected GRPO gradient (top-p 0.9, token normalization, loo)."""
    model, tokenizer = toy_model
    batch = sample(model, tokenizer, 256, seed=11)
    prompts = [p["prompt"] for p in PROMPTS]
    v = exact_terms.exact_grpo_gradient(model, tokenizer, prompts, [p["answer"] for p in PROMPTS], temperature=1.0,
                                  top_p=0.9, max_new_tokens=MAX_NEW_TOKENS, G=G)
    truth = exact_terms.exact_prompt_contributions(model, tokenizer, prompts, v, temperature=1.0, top_p=0.9,
                                             max_new_tokens=MAX_NEW_TOKENS, normalization="token")
    assert float(truth["influence_form"].mean()) == pytest.approx(truth["grad_H_dot_u"], rel=1e-9)
    tokens = e_tokens(model, tokenizer, batch, v, "token", "loo")
    shares = e_shares(tokens, batch, "token")
    sums = passes.sums_of_tokens(tokens, batch["response_lens"])
    n = batch["prompt_ids"].numel()
    for form, column, exact_name in (("influence", "share", "influence_form"), ("direct", "direct", "term")):
        per_prompt = attribution.per_prompt_contributions(sums["P"], sums["Q"], sums["S"], sums["T"],
                                                          batch["prompt_ids"], form)
        # the per-prompt estimates are the prompts' token shares (or direct parts), summed and rescaled
        group_share = shares[column].reshape(n, -1).sum(-1)
        for x, est, count in zip(per_prompt["prompt_ids"], per_prompt["estimate"], per_prompt["count"]):
            mine = float(group_share[batch["prompt_ids"] == x].sum()) * n / float(count)
            assert mine == pytest.approx(float(est), rel=1e-9)
        assert float((per_prompt["estimate"] * per_prompt["count"]).sum()) / n == pytest.approx(shares["X_dot_v"],
                                                                                               rel=1e-9)
        gap = (per_prompt["estimate"] - truth[exact_name][per_prompt["prompt_ids"]]).abs()
        # within 4 SE; a prompt whose responses never change has SE 0 and the exact value 0 (direct form)
        assert bool((gap < 4 * per_prompt["se"] + 1e-9 * abs(truth["grad_H_dot_u"])).all()), (form, per_prompt, truth)
    # the prompts differ: the per-prompt split is resolved, not noise around one value
    spread = truth["influence_form"].max() - truth["influence_form"].min()
    assert spread > 8 * per_prompt["se"].max(), (truth["influence_form"], per_prompt["se"])


# --- the U side ------------------------------------------------------------------------------

def arithmetic():
    from entropy_probe.toy import arithmetic_examples

    return arithmetic_examples(19)


@pytest.fixture(scope="module")
def x_direction(toy_model):
    """A fixed X: the estimated entropy gradient of a 64-group E batch (token, loo)."""
    model, tokenizer = toy_model
    batch = sample(model, tokenizer, 64, seed=21, examples=arithmetic(), top_p=0.95)
    stats = stage_inputs.e_batch_stats([batch])
    grads, _ = passes.x_gradient(model, parameters.select(model), batch, pad_token_id=tokenizer.pad_token_id,
                                 temperature=1.0, top_p=0.95, H_bar=stats["H_bar_token"], normalization="token",
                                 baseline="loo", pathwise_term=True, tf_batch_size=512)
    return {k: g / stats["sum_T"] for k, g in grads.items()}


@pytest.fixture(scope="module")
def u_batch(toy_model):
    model, tokenizer = toy_model
    ids = torch.randperm(400, generator=torch.Generator().manual_seed(5))[:16].tolist()
    return sample(model, tokenizer, 16, seed=5, kind="U", examples=arithmetic(), top_p=0.95, prompt_ids=ids)


def y_of(model, tokenizer, batch, numerators):
    return passes.y_gradient(model, parameters.select(model), batch, numerators, pad_token_id=tokenizer.pad_token_id,
                             temperature=1.0, tf_batch_size=512)


def u_tokens(model, tokenizer, batch, direction):
    return passes.u_directional_tokens(model, direction, batch, pad_token_id=tokenizer.pad_token_id, temperature=1.0,
                                       tf_batch_size=512)


def dot(a, b):
    return float(sum((a[k].double() * b[k].double()).sum() for k in b))


@pytest.mark.parametrize("loss_type,max_grad_norm", [("grpo", 0.0), ("dapo", 0.0), ("dapo", 0.05)])
def test_u_shares_sum_to_x_dot_v_for_sgd(toy_model, x_direction, u_batch, loss_type, max_grad_norm):
    model, tokenizer = toy_model
    advantages = losses.group_advantages(u_batch["rewards"], "none")
    a, z = losses.response_weights(loss_type, advantages, u_batch["response_lens"])
    Y = {k: g / float(z.sum()) for k, g in y_of(model, tokenizer, u_batch, a).items()}
    v = update.update_direction("sgd", Y, max_grad_norm=max_grad_norm)
    if max_grad_norm:
        assert update.clip_coefficient(Y, max_grad_norm) < 1  # clipping is exercised
    J = update.update_jacobian("sgd", Y, max_grad_norm=max_grad_norm)
    u = {k: J[k] * x_direction[k] for k in Y}
    tokens = u_tokens(model, tokenizer, u_batch, u)
    shares = attribution.u_token_shares(tokens["d_log_p"], a, z, u_batch["response_lens"].reshape(-1), G)
    x_dot_v = dot(x_direction, v)
    # forward mode (fp32 forward, float64 sums) against the reverse-mode dot: float tolerance
    assert float(shares["share"].sum()) == pytest.approx(x_dot_v, rel=1e-5)
    assert shares["total"] == pytest.approx(float(shares["share"].sum()), rel=1e-12)
    # the influence form: normalizer terms sum to 0, per group to the influence contribution
    n = u_batch["prompt_ids"].numel()
    per_group = (shares["share"] + shares["normalizer_term"]).reshape(n, -1).sum(-1)
    torch.testing.assert_close(per_group, (shares["total"] + shares["group_influence"]) / n, rtol=1e-9, atol=1e-12)
    if loss_type == "grpo":  # a constant normalizer has no term
        assert float(shares["normalizer_term"].abs().max()) < 1e-12


def test_u_shares_for_adamw_sum_to_the_linearized_value(toy_model, toy_policy_dir, x_direction, u_batch):
    """AdamW from the embedded policy's saved state: the U token shares sum to X·J·Y, the part of
    X·v linear in the batch gradient at this Y (J = ∂v/∂Y). How good the linearization is, on the
    quantity the U-batch SE rests on: the change of X·v when one prompt group leaves the U batch,
    exact (a real AdamW step from the reduced Y) against the linear map. Measured on this toy
    (16 groups, grpo, no clipping): largest error 0.8% of the largest change; X·v = −3.43 of which
    X·J·Y = −4.12 (the rest, +0.69, is the step's intercept: momentum and weight decay)."""
    model, tokenizer = toy_model
    theta = {k: p.detach() for k, p in parameters.select(model).items()}
    state = load_adamw_state(str(toy_policy_dir / STATE_FILE), str(toy_policy_dir / NAMES_FILE), theta).per_param
    advantages = losses.group_advantages(u_batch["rewards"], "none")
    a, z = losses.response_weights("grpo", advantages, u_batch["response_lens"])
    n = a.shape[0]
    per_group = [y_of(model, tokenizer, {k: t[g:g + 1] for k, t in u_batch.items()}, a[g:g + 1]) for g in range(n)]
    numerator = {k: sum(y[k] for y in per_group) for k in per_group[0]}
    Z = float(z.sum())
    Y = {k: t / Z for k, t in numerator.items()}
    v = update.update_direction("adamw", Y, theta, state)
    J = update.update_jacobian("adamw", Y, theta, state)
    u = {k: J[k] * x_direction[k] for k in Y}
    tokens = u_tokens(model, tokenizer, u_batch, u)
    shares = attribution.u_token_shares(tokens["d_log_p"], a, z, u_batch["response_lens"].reshape(-1), G)
    linear = dot(x_direction, {k: J[k] * Y[k] for k in Y})
    assert float(shares["share"].sum()) == pytest.approx(linear, rel=1e-5)
    x_dot_v = dot(x_direction, v)
    errors, changes = [], []
    for g in range(n):
        z_minus = Z - float(z[g].sum())
        Y_minus = {k: (numerator[k] - per_group[g][k]) / z_minus for k in Y}
        exact_change = dot(x_direction, update.update_direction("adamw", Y_minus, theta, state)) - x_dot_v
        linear_change = dot(x_direction, {k: J[k] * (Y_minus[k] - Y[k]) for k in Y})
        errors.append(abs(linear_change - exact_change))
        changes.append(abs(exact_change))
    relative = max(errors) / max(changes)
    message = (f"X·v = {x_dot_v:.4g}, X·J·Y = {linear:.4g}; leave-one-group-out: largest linearization error "
               f"{relative:.2%} of the largest change ({max(changes):.3g})")
    print(message)
    assert relative < 0.05, message


CALIBRATION_BATCHES, CALIBRATION_B = 200, 16


@pytest.fixture(scope="module")
def independent_u_batches(toy_model, x_direction):
    """200 independent U batches of 16 distinct prompts (one rollout call, distinct slots) and
    their per-token ∂_X log p (SGD without clipping: u = X)."""
    model, tokenizer = toy_model
    gen = torch.Generator().manual_seed(99)
    ids = torch.cat([torch.randperm(400, generator=gen)[:CALIBRATION_B] for _ in range(CALIBRATION_BATCHES)]).tolist()
    batch = sample(model, tokenizer, len(ids), seed=99, kind="U", examples=arithmetic(), top_p=0.95, prompt_ids=ids)
    return batch, u_tokens(model, tokenizer, batch, x_direction)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_u_noise_se_is_calibrated(independent_u_batches, loss_type):
    """Over 200 independent U batches (16 distinct prompts each, X fixed), the spread of X·v
    matches the mean reported U-batch SE (influence over prompt groups, with the loss normalizer's
    term for dapo's token mean) within 25%. Measured: 0.94 (dapo), 0.93 (grpo)."""
    batch, tokens = independent_u_batches
    K, B = CALIBRATION_BATCHES, CALIBRATION_B
    T = tokens["d_log_p"].shape[-1]
    values, ses = [], []
    for k in range(K):
        rows = slice(k * B, (k + 1) * B)
        advantages = losses.group_advantages(batch["rewards"][rows], "none")
        a, z = losses.response_weights(loss_type, advantages, batch["response_lens"][rows])
        shares = attribution.u_token_shares(tokens["d_log_p"].reshape(K * B, G, T)[rows].reshape(B * G, T), a, z,
                                            batch["response_lens"][rows].reshape(-1), G)
        values.append(shares["total"])
        ses.append(shares["se"])
    spread = float(torch.tensor(values).std())
    ratio = spread / float(torch.tensor(ses).mean())
    assert 0.75 < ratio < 1.25, (loss_type, spread, float(torch.tensor(ses).mean()), ratio)


# --- the covariance view on a tabular softmax bandit -------------------------------------------

class _Hidden:
    def __init__(self, last_hidden_state):
        self.last_hidden_state = last_hidden_state


class _ConstantDecoder(torch.nn.Module):
    """Every position's final hidden state is the constant 1 (a 1-dimensional feature)."""

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return _Hidden(torch.ones(*input_ids.shape, 1))


class TabularBandit(torch.nn.Module):
    """A one-step softmax policy whose logits are its parameters (the output embedding's weight,
    one parameter per logit), with the interface the probe's passes use."""

    def __init__(self, logits: Tensor):
        super().__init__()
        self.decoder = _ConstantDecoder()
        self.lm_head = torch.nn.Linear(1, logits.numel(), bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(logits[:, None])
        self.config = type("Config", (), {"_attn_implementation": "eager"})()

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.lm_head

    def set_attn_implementation(self, name):
        self.config._attn_implementation = name



def test_covariance_lemma_on_a_tabular_softmax_bandit():
    """Logits = parameters, one action per response: the probe's δH₁ = η·X·v equals −η·Cov(log π, A)
    for a natural-gradient step (v = A) and −η·Cov(log π, π·A) for a vanilla step (v = Y, the exact
    expected policy gradient from the probe's Y pass), with exact expectations under π."""
    V = 7
    gen = torch.Generator().manual_seed(0)
    bandit = TabularBandit(1.5 * torch.randn(V, generator=gen))
    reward = torch.rand(V, generator=gen, dtype=torch.float64)
    log_pi = torch.log_softmax(bandit.lm_head.weight.detach()[:, 0].double(), -1)
    pi = log_pi.exp()
    A = reward - (pi * reward).sum()  # centred under π
    h = float(-(pi * log_pi).sum())
    # every action once: responses of length 1 after a one-token prompt (pad 0 never scored)
    sequences = torch.stack([torch.zeros(V, dtype=torch.long), torch.arange(V)], -1)[None]
    batch = {"sequences": sequences, "attention_masks": torch.ones_like(sequences),
             "prompt_lens": torch.ones(1, dtype=torch.long), "response_lens": torch.ones(1, V, dtype=torch.long),
             "rb_entropies": torch.full((1, V, 1), h), "token_log_q": log_pi.float()[None, :, None],
             "prompt_ids": torch.zeros(1, dtype=torch.long)}
    params = dict(bandit.named_parameters())
    # X: with one token per response the score term has no entropy-to-go: X = ∇h from any batch
    X_sum, _ = passes.x_gradient(bandit, params, batch, pad_token_id=0, temperature=1.0, top_p=1.0, H_bar=h,
                                 normalization="token", baseline="loo", pathwise_term=True, tf_batch_size=V)
    X = {k: g / V for k, g in X_sum.items()}
    # vanilla: Y = E_π[A ∇log π] exactly (each action weighted by π_a) = π⊙A on the logits
    Y = y_of_bandit(bandit, batch, pi * A)
    torch.testing.assert_close(Y["lm_head.weight"][:, 0], pi * A, rtol=1e-5, atol=1e-7)
    natural = {"lm_head.weight": (Y["lm_head.weight"][:, 0] / pi)[:, None]}  # F⁺Y = A (up to a constant)
    eta = 1e-3
    cov_A = covariance.covariance(log_pi, A, weights=pi)["cov"]
    cov_pA = covariance.covariance(log_pi, pi * A, weights=pi)["cov"]
    for v, expected in ((natural, -eta * cov_A), (Y, -eta * cov_pA)):
        assert eta * dot(X, v) == pytest.approx(expected, rel=1e-5)
        # the probe's forward-mode path and its E token shares give the same
        tokens = passes.directional_tokens(bandit, v, batch, pad_token_id=0, temperature=1.0, top_p=1.0,
                                           normalization="token", baseline="loo", pathwise_term=True,
                                           tf_batch_size=V)
        shares = attribution.e_token_shares(tokens["d_entropy"], tokens["d_log_q"], tokens["weight_a"],
                                            tokens["weight_beta"], tokens["entropy"], batch["response_lens"].reshape(-1),
                                            "token")
        assert eta * shares["X_dot_v"] == pytest.approx(expected, rel=1e-5)
    # the two covariances differ here: the lemma tells the steps apart
    assert abs(cov_A - cov_pA) > 0.1 * abs(cov_A)


def y_of_bandit(bandit, batch, weights):
    return passes.y_gradient(bandit, dict(bandit.named_parameters()), batch, weights.float()[None],
                             pad_token_id=0, temperature=1.0, tf_batch_size=64)


def test_covariance_se_and_rank_statistics():
    """Cov(x, y) over tokens with its delta-method SE over groups (calibrated on simulated batches
    with within-group correlation), Spearman's ρ against scipy, top shares."""
    from scipy import stats

    gen = torch.Generator().manual_seed(1)
    covs, ses = [], []
    for _ in range(300):
        groups = torch.arange(40).repeat_interleave(torch.randint(2, 9, (40,), generator=gen))
        shift = torch.randn(40, generator=gen)[groups]  # correlated within a group
        x = shift + torch.randn(groups.numel(), generator=gen)
        y = 0.5 * x + shift + torch.randn(groups.numel(), generator=gen)
        out = covariance.covariance(x, y, groups)
        covs.append(out["cov"])
        ses.append(out["se"])
    ratio = float(torch.tensor(covs).std() / torch.tensor(ses).mean())
    assert 0.85 < ratio < 1.15, ratio
    x64, y64 = x.double(), y.double()
    assert covariance.covariance(x, y)["cov"] == pytest.approx(float(torch.cov(torch.stack([x64, y64]),
                                                                              correction=0)[0, 1]), rel=1e-12)
    ties = torch.tensor([1.0, 2.0, 2.0, 3.0, 0.0, 5.0, 5.0])
    other = torch.tensor([0.3, 0.1, 0.4, 0.2, 0.0, 0.9, 0.8])
    assert covariance.spearman(ties, other) == pytest.approx(stats.spearmanr(ties, other).statistic, rel=1e-12)
    shares = torch.tensor([-3.0, 1.0, -1.0, 0.5])
    assert covariance.top_share(torch.tensor([0.0, 0.0, 9.0, 1.0]), shares, -2.5, 0.25) == pytest.approx(0.4)
    assert attribution.top_fraction(shares, -2.5, (0.25, 0.5)) == {"top_0.25": pytest.approx(1.2),
                                                                   "top_0.5": pytest.approx(1.6)}


@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_update_jacobian_is_the_derivative_of_the_step(with_state, max_grad_norm):
    """J = ∂v/∂Y of update.update_jacobian against central finite differences of the AdamW step
    (the clip coefficient held fixed, as the linearization states)."""
    gen = torch.Generator().manual_seed(0)
    Y = {"a": 1e-2 * torch.randn(5, generator=gen, dtype=torch.float64),
         "b": torch.randn(3, generator=gen, dtype=torch.float64)}
    theta = {k: torch.randn(y.shape, generator=gen, dtype=torch.float64) for k, y in Y.items()}
    state = None
    if with_state:
        state = {k: update.AdamWParamState(step=7, exp_avg=1e-2 * torch.randn(y.shape, generator=gen, dtype=torch.float64),
                                           exp_avg_sq=1e-3 * torch.rand(y.shape, generator=gen, dtype=torch.float64),
                                           hyper=update.AdamWHyper((0.9, 0.99), 1e-8, 0.1)) for k, y in Y.items()}
    J = update.update_jacobian("adamw", Y, theta, state, max_grad_norm)
    coef = update.clip_coefficient({k: -y for k, y in Y.items()}, max_grad_norm)
    assert (coef < 1) == (max_grad_norm > 0)

    def step(Yp):
        return update.adamw_direction({k: coef * y for k, y in Yp.items()}, theta, state, 0.0)

    eps = 1e-7
    for k in Y:
        for i in range(Y[k].numel()):
            up, down = ({n: y.clone() for n, y in Y.items()} for _ in range(2))
            up[k][i] += eps
            down[k][i] -= eps
            numeric = float(step(up)[k][i] - step(down)[k][i]) / (2 * eps)
            assert float(J[k][i]) == pytest.approx(numeric, rel=1e-5, abs=1e-6)
    sgd = update.update_jacobian("sgd", Y, max_grad_norm=max_grad_norm)
    assert all(torch.all(sgd[k] == update.clip_coefficient(Y, max_grad_norm)) for k in Y)
