"""Self-tests of the exact-enumeration ground truth (tests/exact.py) on the embedded toy policy.

Gradient checks by finite differences use a float64 copy of the model whose RMSNorm layers are
made to compute in float64 (HF's Llama RMSNorm casts to fp32, which makes H(θ) piecewise-flat at
the 1e-8 level and swamps small differences); on that copy H(θ + εd) is smooth to float64
rounding and central differences agree with autograd to ~ε².
"""
from __future__ import annotations

import copy
import itertools
import math
import types

import pytest
import torch

from entropy_probe import exact_terms, generate, gradients, measure, parameters, rewards
from entropy_probe.noise import STREAM_E, NoiseKey
from entropy_probe.toy import EOS, PAD, VOCAB

from entropy_probe import exact


PROMPTS = ["3+5=", "12+7=", "9+9=", "0+0="]  # "12+7=" is one token longer than the others
GOLDS = ["8", "19", "18", "0"]
MAX_NEW = 3
SETTINGS = [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8), (0.7, 0.8)]
EOS_ID, PAD_ID = VOCAB.index(EOS), VOCAB.index(PAD)


def _float64_rmsnorm(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture(scope="module")
def smooth_model(toy_model):
    """A float64 copy of the toy policy with float64 RMSNorms (patched per instance, nothing global)."""
    model, tokenizer = toy_model
    model64 = copy.deepcopy(model).double()
    patched = 0
    for module in model64.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_float64_rmsnorm, module)
            patched += 1
    assert patched > 0
    return model64, tokenizer


def _random_direction(model, seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        for name, p in model.named_parameters()
    }


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _single_sequence_scores(model, tokenizer, prompt: str, response: list[int], temperature, top_p):
    """Unbatched, unpadded teacher forcing of one response with the package's measure functions:
    (Σ log q, Σ h, per-token log softmax(z/τ)), fp32 -> float64."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([prompt_ids + response])
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1: -1]
    tokens = torch.tensor(response)
    token_log_q, entropy, in_nucleus = measure.score_tokens(logits, tokens, temperature, top_p)
    assert bool(in_nucleus.all())
    log_p = measure.tempered_token_log_prob(logits, tokens, temperature)
    return token_log_q.double().sum(), entropy.double().sum(), log_p.double()


# --- 1. the enumeration is a complete probability tree, scored like unbatched teacher forcing ---

@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_probabilities_sum_to_one(toy_model, temperature, top_p):
    model, tokenizer = toy_model
    with torch.no_grad():
        enum = exact.enumerate_responses(
            model, tokenizer, PROMPTS, temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW
        )
    total = enum.per_prompt(torch.ones_like(enum.log_q))
    assert torch.allclose(total, torch.ones(len(PROMPTS), dtype=torch.float64), atol=1e-6), total
    assert torch.isfinite(enum.log_q).all() and (enum.entropy_sum >= 0).all()

    # Structure: a response ends at its first EOS or at max_new_tokens; pad (id 13) past the end.
    positions = torch.arange(MAX_NEW)[None, :]
    inside = positions < enum.lengths[:, None]
    assert (enum.tokens[~inside] == PAD_ID).all()
    assert ((enum.tokens == EOS_ID) & inside & (positions < enum.lengths[:, None] - 1)).sum() == 0
    last = enum.tokens.gather(1, (enum.lengths - 1)[:, None]).squeeze(1)
    assert ((last == EOS_ID) | (enum.lengths == MAX_NEW)).all()
    assert (enum.log_p_tempered[~inside] == 0).all()
    # Every response appears once.
    keys = {(i, tuple(row)) for i, row in zip(enum.prompt_index.tolist(), enum.tokens.tolist())}
    assert len(keys) == enum.tokens.shape[0]
    if top_p == 1.0:
        # Full tree: 1 (EOS first) + 13 (EOS second) + 13*13*14 leaves per prompt (pad is a token).
        assert enum.tokens.shape[0] == len(PROMPTS) * (1 + 13 + 13 * 13 * 14)
        # The model puts probability on sampled pad tokens too; those responses are enumerated.
        assert (enum.tokens[inside] == PAD_ID).any()
    else:
        assert enum.tokens.shape[0] < len(PROMPTS) * 14  # the nucleus prunes the tree


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.0, 0.8)])
def test_enumeration_matches_unbatched_teacher_forcing(toy_model, temperature, top_p):
    """The batched, right-padded depth-wise scoring equals one-sequence-at-a-time scoring with the
    package's fp32 measure functions (a position/padding bug would break this; the sum-to-one
    test cannot see it)."""
    model, tokenizer = toy_model
    with torch.no_grad():
        enum = exact.enumerate_responses(
            model, tokenizer, PROMPTS, temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW
        )
        gen = torch.Generator().manual_seed(0)
        # Most probable leaves plus a random sample of the others, across all prompts.
        picks = torch.cat([torch.topk(enum.log_q, min(6, enum.log_q.shape[0])).indices,
                           torch.randperm(enum.log_q.shape[0], generator=gen)[:12]]).unique()
        for i in picks.tolist():
            length = int(enum.lengths[i])
            log_q, entropy, log_p = _single_sequence_scores(
                model, tokenizer, PROMPTS[int(enum.prompt_index[i])], enum.tokens[i, :length].tolist(),
                temperature, top_p,
            )
            assert float(enum.log_q[i]) == pytest.approx(float(log_q), rel=3e-6, abs=2e-5)
            assert float(enum.entropy_sum[i]) == pytest.approx(float(entropy), rel=3e-6, abs=2e-5)
            assert torch.allclose(enum.log_p_tempered[i, :length], log_p, atol=2e-5)


# --- 2. the real sampler draws from q: Monte Carlo against the exact values ---

@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampler_agrees_with_exact_measure(toy_model, temperature, top_p):
    model, tokenizer = toy_model
    prompts, n = PROMPTS[:3], 4096
    V = len(VOCAB)
    with torch.no_grad():
        enum = exact.enumerate_responses(
            model, tokenizer, prompts, temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW
        )
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    rollouts = generate.sample(
        model, encoded["input_ids"], encoded["attention_mask"], n, temperature=temperature, top_p=top_p,
        max_new_tokens=MAX_NEW, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        noise_key=NoiseKey(12345, STREAM_E), slots=range(len(prompts)),
    )
    tokens = torch.nn.functional.pad(
        rollouts.response_tokens, (0, MAX_NEW - rollouts.response_tokens.shape[1]), value=PAD_ID
    )
    prompt_of_row = torch.arange(len(prompts)).repeat_interleave(n)

    # Each sampled response is an enumerated leaf (q > 0), with the same log q and S.
    def keys(prompt_index, lengths, toks):
        key = prompt_index * (MAX_NEW + 1) + lengths
        for k in range(MAX_NEW):
            key = key * V + toks[:, k]
        return key

    leaf_keys = keys(enum.prompt_index, enum.lengths, enum.tokens)
    order = torch.argsort(leaf_keys)
    sample_keys = keys(prompt_of_row, rollouts.response_lens, tokens)
    where = torch.searchsorted(leaf_keys[order], sample_keys).clamp(max=leaf_keys.shape[0] - 1)
    leaf = order[where]
    assert (leaf_keys[leaf] == sample_keys).all(), "the sampler drew a response with q = 0"
    assert torch.allclose(rollouts.token_log_q.double().sum(1), enum.log_q[leaf], atol=1e-4)
    assert torch.allclose(rollouts.entropies.double().sum(1), enum.entropy_sum[leaf], atol=1e-4)

    # Mean S and mean T per prompt within 4 standard errors of E_q[S], E_q[T] (the exact SE, from
    # Var_q: a sample SD underestimates it when a rare outcome, such as a short response, is missed).
    for values, leaf_values in [(rollouts.entropies.double().sum(1), enum.entropy_sum),
                                (rollouts.response_lens.double(), enum.lengths.double())]:
        per_prompt = values.view(len(prompts), n)
        exact_values = enum.per_prompt(leaf_values)
        se = (enum.per_prompt(leaf_values ** 2) - exact_values ** 2).clamp(min=0).sqrt() / math.sqrt(n)
        assert ((per_prompt.mean(1) - exact_values).abs() <= 4 * se + 1e-6).all(), (
            per_prompt.mean(1), exact_values, se)

    # First-token frequencies against the exact marginal q(y_1 | x) (tokens outside S_1 never drawn).
    for b in range(len(prompts)):
        mine = enum.prompt_index == b
        marginal = torch.zeros(V, dtype=torch.float64).index_add(0, enum.tokens[mine, 0], enum.q[mine])
        freq = torch.bincount(tokens[prompt_of_row == b, 0], minlength=V).double() / n
        se = torch.sqrt(torch.clamp(marginal * (1 - marginal), min=1.0 / n) / n)
        assert ((freq - marginal).abs() <= 4 * se).all(), (b, freq, marginal)
        assert (freq[marginal == 0] == 0).all()


# --- 3. exact ∇H against finite differences ---

@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_entropy_grad_matches_finite_difference(toy_model, smooth_model, normalization):
    kw = dict(temperature=0.7, top_p=1.0, max_new_tokens=MAX_NEW, normalization=normalization)
    model64, tokenizer = smooth_model
    before = _snapshot(model64)
    grad = exact.exact_entropy_grad(model64, tokenizer, PROMPTS, **kw)
    assert set(grad) == {n for n, p in model64.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in model64.parameters())

    # A random direction over every parameter, applied in place to a copy (not via functional_call).
    direction = _random_direction(model64, seed=1)
    eps = 1e-6
    shifted = copy.deepcopy(model64)
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for name, p in shifted.named_parameters():
                p.copy_(before[name] + sign * eps * direction[name])
            enum = exact.enumerate_responses(shifted, tokenizer, PROMPTS, temperature=0.7, top_p=1.0,
                                             max_new_tokens=MAX_NEW)
        values.append(exact.exact_entropy(enum, normalization).item())
    finite_difference = (values[0] - values[1]) / (2 * eps)
    directional = gradients.dot(gradients.restrict(grad, direction), direction)
    assert abs(directional) > 0.1
    assert finite_difference == pytest.approx(directional, rel=1e-5)

    if normalization == "sequence":
        return
    # The fp32 model's gradient (the one tests of the package compare against) is the same to fp32
    # precision, per parameter tensor.
    model32, _ = toy_model
    grad32 = exact.exact_entropy_grad(model32, tokenizer, PROMPTS, **kw)
    for name, g in grad.items():
        assert torch.allclose(grad32[name], g, rtol=1e-3, atol=1e-5 * float(g.abs().max()) + 1e-9), name
    assert all(p.grad is None for p in model32.parameters())


# --- 4. exact H(θ + ηv) ---

@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_entropy_at_zero_step_is_entropy(toy_model, temperature, top_p):
    model, tokenizer = toy_model
    before = _snapshot(model)
    kw = dict(temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW)
    direction = _random_direction(model, seed=2)
    with torch.no_grad():
        enum = exact.enumerate_responses(model, tokenizer, PROMPTS, **kw)
    for normalization in ("token", "sequence"):
        h = exact.exact_entropy(enum, normalization).item()
        for nucleus in ("own", "base"):
            h0 = exact.exact_entropy_at(model, tokenizer, PROMPTS, normalization=normalization,
                                        direction=direction, eta=0.0, nucleus=nucleus, **kw)
            assert h0 == pytest.approx(h, rel=1e-12, abs=1e-12)
    h1 = exact.exact_entropy_at(model, tokenizer, PROMPTS, normalization="sequence",
                                direction=direction, eta=1e-2, **kw)
    assert abs(h1 - exact.exact_entropy(enum, "sequence").item()) > 1e-5  # the shift is really applied
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "exact_entropy_at changed the model"


def test_entropy_at_is_first_order_in_eta(smooth_model, normalization="token"):
    """(H(θ+ηd) − H(θ)) / (η ∇H·d) → 1 linearly in η (own nucleus, top_p = 1)."""
    model64, tokenizer = smooth_model
    kw = dict(temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW, normalization=normalization)
    h, grad = exact.exact_entropy_and_grad(model64, tokenizer, PROMPTS, **kw)
    direction = _random_direction(model64, seed=3, scale=0.1)
    slope = gradients.dot(gradients.restrict(grad, direction), direction)
    errors = []
    for eta in (1e-3, 1e-4):
        h_eta = exact.exact_entropy_at(model64, tokenizer, PROMPTS, direction=direction, eta=eta, **kw)
        errors.append(abs((h_eta - h) / (eta * slope) - 1))
    assert errors[1] < 0.2 * errors[0]  # linear convergence: a factor ~10 per decade
    assert errors[1] < 1e-2


def test_fixed_nucleus_gradient_with_top_p(smooth_model):
    """With top_p < 1, H with the nucleus held at θ's (nucleus="base") is smooth in η and its
    derivative is the exact ∇H (nucleus held fixed); the own-nucleus H agrees at small η."""
    model64, tokenizer = smooth_model
    kw = dict(temperature=0.7, top_p=0.8, max_new_tokens=MAX_NEW, normalization="token")
    grad = exact.exact_entropy_grad(model64, tokenizer, PROMPTS, **kw)
    direction = _random_direction(model64, seed=4)
    eps = 1e-6
    plus, minus = (
        exact.exact_entropy_at(model64, tokenizer, PROMPTS, direction=direction, eta=s * eps,
                               nucleus="base", **kw)
        for s in (1.0, -1.0)
    )
    directional = gradients.dot(gradients.restrict(grad, direction), direction)
    assert abs(directional) > 1e-3
    assert (plus - minus) / (2 * eps) == pytest.approx(directional, rel=1e-5)

    # At a step large enough to move a nucleus boundary, "base" keeps θ's tree (and is still a
    # probability measure) while "own" does not.
    enum_kw = dict(temperature=0.7, top_p=0.8, max_new_tokens=MAX_NEW)
    shifted = parameters.shifted(model64, direction, 0.03)
    with torch.no_grad():
        at_theta = exact.enumerate_responses(model64, tokenizer, PROMPTS, **enum_kw)
        base = exact.enumerate_responses(model64, tokenizer, PROMPTS, params=shifted, nucleus="base", **enum_kw)
        own = exact.enumerate_responses(model64, tokenizer, PROMPTS, params=shifted, nucleus="own", **enum_kw)
    assert torch.equal(base.tokens, at_theta.tokens) and torch.equal(base.prompt_index, at_theta.prompt_index)
    assert torch.allclose(base.per_prompt(torch.ones_like(base.log_q)), torch.ones(len(PROMPTS), dtype=torch.float64))
    moved = own.tokens.shape != base.tokens.shape or not torch.allclose(base.entropy_sum, own.entropy_sum)
    assert moved, "the step moved no nucleus boundary"


# --- 5. exact E[Y] of GRPO against brute force over groups ---

def _per_response_scores(model, tokenizer, prompts, golds, *, temperature, top_p, max_new_tokens):
    """For every enumerated response: q, the reward and f = (1/T) Σ_k ∇ log softmax(z_k/τ)(y_k)
    (flattened, from one unbatched forward/backward per response), grouped by prompt."""
    params = parameters.select(model)
    names = list(params)
    with torch.no_grad():
        enum = exact.enumerate_responses(
            model, tokenizer, prompts, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens
        )
    groups = []
    for b, (prompt, gold) in enumerate(zip(prompts, golds)):
        leaves = (enum.prompt_index == b).nonzero().squeeze(1).tolist()
        prompt_ids = tokenizer(prompt)["input_ids"]
        f, r = [], []
        for i in leaves:
            response = enum.tokens[i, : int(enum.lengths[i])].tolist()
            ids = torch.tensor([prompt_ids + response])
            logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1: -1]
            log_p = torch.log_softmax(logits.double() / temperature, -1).gather(
                -1, torch.tensor(response)[:, None]).squeeze(1)
            grads = torch.autograd.grad(log_p.mean(), [params[k] for k in names], allow_unused=True)
            f.append(torch.cat([(torch.zeros_like(params[k]) if g is None else g).reshape(-1).double()
                                for k, g in zip(names, grads)]))
            r.append(rewards.exact_match(tokenizer.decode(response, skip_special_tokens=True), gold))
        r = torch.tensor(r, dtype=torch.float64)
        q = enum.q[leaves]
        groups.append((q, r, torch.stack(f)))
    # a prompt whose nucleus holds one answer contributes 0; at least one must not (how many do
    # depends on the trained toy policy, which differs across CPUs at float rounding)
    assert any(0 < float((q * r).sum()) < 1 for q, r, _ in groups), "rewards do not vary: the test would be vacuous"
    return groups, names


def _brute_force_grpo(groups, G: int) -> torch.Tensor:
    """E[Y] = mean_x Σ_{y_1..y_G} Π_g q(y_g) · (1/G) Σ_g A_g f(y_g), A_g = r_g − mean_g' r_g',
    summed over every ordered G-tuple of responses. Y is linear in the f's: each tuple adds
    Π q · A_g / G to the weight of the response in slot g, then the weights contract with f."""
    total = 0.0
    for q, r, f in groups:
        tuples = torch.tensor(list(itertools.product(range(q.shape[0]), repeat=G)))
        prob = q[tuples].prod(1)
        r_t = r[tuples]
        advantage = r_t - r_t.mean(1, keepdim=True)
        weight = torch.zeros(q.shape[0], dtype=torch.float64).index_add(
            0, tuples.reshape(-1), (prob[:, None] * advantage / G).reshape(-1))
        total = total + weight @ f
    return total / len(groups)


def _flatten(tensors: dict, names: list[str]) -> torch.Tensor:
    """A name -> tensor dict as one float64 vector, in ``names`` order."""
    return torch.cat([tensors[k].reshape(-1).to(torch.float64) for k in names])


@pytest.mark.parametrize(
    "prompts,golds,temperature,top_p,max_new_tokens,group_sizes",
    [
        (PROMPTS[:2], GOLDS[:2], 1.0, 0.99, MAX_NEW, (2, 3)),  # 4 + 16 responses, T = 2..3
        (PROMPTS[:3], GOLDS[:3], 0.7, 0.8, MAX_NEW, (2, 4)),
        (["3+5="], ["8"], 1.0, 1.0, 1, (2,)),  # the whole vocabulary, pad included
    ],
)
def test_grpo_gradient_matches_brute_force(smooth_model, prompts, golds, temperature, top_p,
                                           max_new_tokens, group_sizes):
    model64, tokenizer = smooth_model
    kw = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    groups, names = _per_response_scores(model64, tokenizer, prompts, golds, **kw)
    for G in group_sizes:
        closed = _flatten(exact_terms.exact_grpo_gradient(model64, tokenizer, prompts, golds, G=G, **kw), names)
        assert all(p.grad is None for p in model64.parameters())
        brute = _brute_force_grpo(groups, G)
        assert float(brute.norm()) > 1e-3
        assert float((closed - brute).norm()) <= 1e-6 * float(brute.norm()), G
