"""The chunked, fused passes equal the plain ones (full ``[n, T, V]`` logits through autograd) to
float tolerance: the nucleus without a full sort, the closed-form logit gradient, teacher-forced
scores, the X and Y surrogates and their gradients, the forward-mode sums and the SNIS quantities,
with chunk sizes that do not divide the number of tokens, top_p < 1 and τ ≠ 1."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from entropy_probe import (estimators, generate, logit_gradient, losses, measure, parameters, passes, snis_pass,
                           teacher_force, tf_layout)
from entropy_probe.noise import STREAM_E, NoiseKey

SETTINGS = [(1.0, 1.0), (0.7, 0.8), (1.3, 0.95)]  # (temperature, top_p)
CHUNKS = [1, 7, 10**6]  # one token at a time, a size that divides nothing here, one chunk


def sort_nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The rule of measure.nucleus_mask written with a full stable sort (the reference)."""
    if top_p >= 1.0:
        return torch.ones(logits.shape, dtype=torch.bool)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < top_p
    keep[..., 0] = True
    return torch.zeros_like(keep).scatter(-1, order, keep)


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])
def test_nucleus_without_full_sort_equals_the_sort_rule(top_p, scale):
    g = torch.Generator().manual_seed(int(top_p * 1000 + scale * 10))
    logits = torch.randn(3, 41, 2000, generator=g) * scale
    for temperature in (1.0, 0.6):
        assert torch.equal(measure.nucleus_mask(logits, temperature, top_p), sort_nucleus(logits, temperature, top_p))


@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.77, 0.9])
def test_nucleus_ties_break_by_token_id_like_the_stable_sort(top_p):
    g = torch.Generator().manual_seed(5)
    logits = torch.randint(0, 4, (64, 300), generator=g).float()  # many exact ties, also at the boundary
    logits[:8] = 0.0  # flat rows: the nucleus needs more than the first topk candidates
    assert torch.equal(measure.nucleus_mask(logits, 1.0, top_p), sort_nucleus(logits, 1.0, top_p))


def _reference_objective(logits, tokens, temperature, top_p, c_h, c_q, c_p):
    token_log_q, entropy, _ = measure.score_tokens(logits, tokens, temperature, top_p)
    log_p = measure.tempered_token_log_prob(logits, tokens, temperature)
    total = torch.zeros((), dtype=torch.float64)
    for c, x in ((c_h, entropy), (c_q, token_log_q), (c_p, log_p)):
        if c is not None:
            total = total + (c * x).sum().double()
    return total, token_log_q, entropy, log_p


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
@pytest.mark.parametrize("terms", ["hq", "q", "h", "p", "hqp"])
def test_closed_form_logit_gradient_matches_autograd(temperature, top_p, terms):
    g = torch.Generator().manual_seed(11)
    R, V = 29, 300
    logits = torch.randn(R, V, generator=g) * 3
    q = torch.softmax(logits / temperature, -1) * measure.nucleus_mask(logits, temperature, top_p)
    tokens = torch.multinomial(q, 1, generator=g).squeeze(-1)  # sampled from q: inside the nucleus
    coef = {k: (torch.randn(R, generator=g) if k in terms else None) for k in "hqp"}
    leaf = logits.clone().requires_grad_(True)
    value, token_log_q, entropy, log_p = _reference_objective(leaf, tokens, temperature, top_p,
                                                              coef["h"], coef["q"], coef["p"])
    value.backward()
    workspace = torch.empty(R * V + 13)
    scores, grad = logit_gradient.scores_with_logit_gradient(
        logits.clone(), tokens, temperature, top_p, want_q="h" in terms or "q" in terms, want_tempered="p" in terms,
        coef_entropy=coef["h"], coef_log_q=coef["q"], coef_tempered=coef["p"], overwrite=True, workspace=workspace,
    )
    torch.testing.assert_close(grad, leaf.grad, atol=2e-6, rtol=1e-4)
    if "h" in terms or "q" in terms:
        assert scores["in_nucleus"].all()
        torch.testing.assert_close(scores["token_log_q"], token_log_q.detach(), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(scores["entropy"], entropy.detach(), atol=2e-6, rtol=1e-5)
    if "p" in terms:
        torch.testing.assert_close(scores["tempered_log_p"], log_p.detach(), atol=2e-6, rtol=1e-5)


def test_closed_form_scores_flag_tokens_outside_the_nucleus():
    logits = torch.tensor([[5.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    scores, _ = logit_gradient.scores_with_logit_gradient(logits, torch.tensor([2, 1]), 1.0, 0.5)
    assert scores["in_nucleus"].tolist() == [False, True]
    assert torch.isneginf(scores["token_log_q"][0]) and torch.isfinite(scores["token_log_q"][1])
    assert torch.equal(logits, torch.tensor([[5.0, 0.0, -1.0], [0.0, 0.0, 0.0]]))  # not overwritten by default


# ---------------------------------------------------------------------------------------------
# a small random Qwen2 and rollouts sampled from its q


def small_qwen2(tied: bool, bias: bool = False, vocab: int = 97, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied, bos_token_id=None, pad_token_id=None, eos_token_id=vocab - 1)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    if bias:
        model.lm_head = nn.Linear(32, vocab, bias=True)
    with torch.no_grad():  # a peaked policy, so top-p cuts
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def sampled_rollout(model, *, B=3, G=3, P=5, T=6, temperature=1.0, top_p=1.0, seed=0):
    """A rollout shard (entropy_probe.rollout layout) sampled from q: varied prompt lengths,
    responses that end at EOS or at T."""
    V = model.config.vocab_size
    pad, eos = V - 2, V - 1
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(2, P + 1, (B,), generator=g)
    prompt_mask = (torch.arange(P)[None, :] >= (P - prompt_lens)[:, None]).long()
    prompt_tokens = torch.where(prompt_mask.bool(), torch.randint(0, V - 2, (B, P), generator=g), pad)
    out = generate.sample(model, prompt_tokens, prompt_mask, G, temperature=temperature, top_p=top_p,
                          max_new_tokens=T, eos_token_id=eos, pad_token_id=pad,
                          noise_key=NoiseKey(seed, STREAM_E), slots=range(B))
    width = out.response_tokens.shape[1]
    valid = torch.arange(width)[None, :] < out.response_lens[:, None]
    rewards = (torch.rand(B, G, generator=g) < 0.5).float()
    lens = out.response_lens.view(B, G)
    return {
        "sequences": torch.cat([prompt_tokens.repeat_interleave(G, 0), out.response_tokens], 1).view(B, G, -1),
        "attention_masks": torch.cat([prompt_mask.repeat_interleave(G, 0), valid.long()], 1).view(B, G, -1),
        "prompt_lens": prompt_lens, "response_lens": lens, "max_lengths": lens.max(-1).values,
        "rewards": rewards,
        "token_log_q": out.token_log_q.view(B, G, -1), "rb_entropies": out.entropies.view(B, G, -1),
    }, pad


def reference_scores(model, batch, temperature, top_p):
    """Per-token log q, h, tempered log p from the full [n, T, V] logits (the unchunked path)."""
    logits = teacher_force.ResponseLogits(model)(batch.input_ids, batch.attention_mask, batch.prompt_lens,
                                                 batch.response_tokens.shape[1])
    lq, h, inside = measure.score_tokens(logits, batch.response_tokens, temperature, top_p)
    valid = batch.response_mask
    assert inside[valid].all()
    log_p = measure.tempered_token_log_prob(logits, batch.response_tokens, temperature)
    return (torch.where(valid, lq, 0.0), torch.where(valid, h, 0.0), torch.where(valid, log_p, 0.0))


def grads_of(model, value):
    params = [p for p in model.parameters() if p.requires_grad]
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(value, params, allow_unused=True), params)]


def assert_grads_close(a, b, rtol=2e-4):
    scale = max(float(x.abs().max()) for x in b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=rtol * scale, rtol=rtol)


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_scores_equal_unchunked(temperature, top_p, chunk):
    model = small_qwen2(tied=False)
    rollout, pad = sampled_rollout(model, temperature=temperature, top_p=top_p, seed=1)
    batch = tf_layout.from_rollout(rollout, pad)
    assert batch.response_mask.sum() > chunk or chunk >= 10**6
    with torch.no_grad():
        lq, h, log_p = reference_scores(model, batch, temperature, top_p)
        s = teacher_force.score(teacher_force.ResponseLogits(model), batch, temperature, top_p, want_tempered=True,
                                chunk_tokens=chunk)
    torch.testing.assert_close(s.token_log_q, lq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.entropy, h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.tempered_log_p, log_p, atol=1e-5, rtol=1e-5)
    # the sampling-time records agree too (the sampler and teacher forcing share the measure)
    torch.testing.assert_close(s.entropy, rollout["rb_entropies"].reshape(s.entropy.shape), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_checkpointed_score_gradients_equal_unchunked(temperature, top_p):
    model = small_qwen2(tied=True)
    rollout, pad = sampled_rollout(model, temperature=temperature, top_p=top_p, seed=2)
    batch = tf_layout.from_rollout(rollout, pad)
    a = torch.randn(batch.response_tokens.shape, generator=torch.Generator().manual_seed(0))
    lq, h, _ = reference_scores(model, batch, temperature, top_p)
    expected = grads_of(model, (h + a * lq).sum())
    s = teacher_force.score(teacher_force.ResponseLogits(model), batch, temperature, top_p, chunk_tokens=5)
    assert_grads_close(grads_of(model, (s.entropy + a * s.token_log_q).sum()), expected)


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("head", ["untied", "tied", "bias", "adapter"])
def test_fused_surrogate_value_and_gradients_equal_autograd(temperature, top_p, chunk, head):
    model = small_qwen2(tied=head == "tied", bias=head == "bias")
    if head == "adapter":  # an output embedding that is not a plain nn.Linear: the checkpointed fallback
        class Wrapped(nn.Linear):
            pass

        wrapped = Wrapped(32, model.config.vocab_size, bias=False)
        wrapped.weight = model.lm_head.weight
        model.lm_head = wrapped
    rollout, pad = sampled_rollout(model, temperature=temperature, top_p=top_p, seed=3)
    batch = tf_layout.from_rollout(rollout, pad)
    g = torch.Generator().manual_seed(1)
    valid = batch.response_mask.float()
    c_h, c_q, c_p = valid, torch.randn(valid.shape, generator=g) * valid, torch.randn(valid.shape, generator=g) * valid
    for coefs in ((c_h, c_q, None), (None, c_q, None), (None, None, c_p), (c_h, c_q, c_p)):
        lq, h, log_p = reference_scores(model, batch, temperature, top_p)
        reference = sum((c * x).sum() for c, x in zip(coefs, (h, lq, log_p)) if c is not None)
        expected = grads_of(model, reference)
        value, scores = teacher_force.surrogate(teacher_force.ResponseLogits(model), batch, temperature, top_p,
                                                coef_entropy=coefs[0], coef_log_q=coefs[1], coef_tempered=coefs[2],
                                                chunk_tokens=chunk)
        torch.testing.assert_close(value.double(), reference.detach().double(), atol=1e-4, rtol=1e-5)
        assert_grads_close(grads_of(model, value), expected)
        if coefs[1] is not None:
            torch.testing.assert_close(scores.token_log_q, lq.detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(scores.entropy, h.detach(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the passes


def reference_x_gradient(model, rollout, pad, temperature, top_p, H_bar, pathwise_term=True):
    batch = tf_layout.from_rollout(rollout, pad)
    coefs = estimators.x_coefficients(rollout["rb_entropies"], rollout["response_lens"], H_bar, "token", "loo",
                                      pathwise_term)
    lq, h, _ = reference_scores(model, batch, temperature, top_p)
    value = estimators.surrogate_value(coefs, h, lq)
    return dict(zip([n for n, p in model.named_parameters()], grads_of(model, value))), h.double().sum(-1)


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_x_and_y_passes_equal_the_unchunked_gradients(temperature, top_p):
    model = small_qwen2(tied=False)
    rollout, pad = sampled_rollout(model, B=4, G=3, temperature=temperature, top_p=top_p, seed=4)
    params = parameters.select(model)
    H_bar = float(rollout["rb_entropies"].sum() / rollout["response_lens"].sum())
    expected, S = reference_x_gradient(model, rollout, pad, temperature, top_p, H_bar)
    for tf_batch_size, chunk in ((5, 7), (1000, 1), (2, 10**6)):
        grads, stats = passes.x_gradient(model, params, rollout, pad_token_id=pad, temperature=temperature,
                                         top_p=top_p, H_bar=H_bar, normalization="token", baseline="loo",
                                         pathwise_term=True, tf_batch_size=tf_batch_size, chunk_tokens=chunk)
        assert_grads_close([grads[k] for k in expected], [expected[k].double() for k in expected])
        torch.testing.assert_close(stats["S"], S, atol=1e-5, rtol=1e-6)
    # Y: the GRPO objective's gradient
    batch = tf_layout.from_rollout(rollout, pad)
    advantages = losses.group_advantages(rollout["rewards"], "none")
    coef, _ = losses.response_weights("seq_mean_token_mean", advantages, rollout["response_lens"])
    _, _, log_p = reference_scores(model, batch, temperature, top_p)
    y_expected = grads_of(model, (coef.reshape(-1, 1).float() * log_p).sum())
    for tf_batch_size, chunk in ((5, 7), (1000, 3)):
        grads = passes.y_gradient(model, params, rollout, coef, pad_token_id=pad, temperature=temperature,
                                  tf_batch_size=tf_batch_size, chunk_tokens=chunk)
        assert_grads_close([grads[k] for k in expected], [g.double() for g in y_expected])


def test_x_pass_without_rb_gradient_drops_only_the_pathwise_term():
    model = small_qwen2(tied=True)
    rollout, pad = sampled_rollout(model, temperature=0.7, top_p=0.8, seed=5)
    params = parameters.select(model)
    expected, _ = reference_x_gradient(model, rollout, pad, 0.7, 0.8, 1.0, pathwise_term=False)
    grads, _ = passes.x_gradient(model, params, rollout, pad_token_id=pad, temperature=0.7, top_p=0.8, H_bar=1.0,
                                 normalization="token", baseline="loo", pathwise_term=False, tf_batch_size=4,
                                 chunk_tokens=5)
    assert_grads_close([grads[k] for k in expected], [expected[k].double() for k in expected])


def test_bf16_autocast_x_pass_is_close_to_fp32():
    model = small_qwen2(tied=False)
    rollout, pad = sampled_rollout(model, seed=6)
    params = parameters.select(model)
    kwargs = dict(pad_token_id=pad, temperature=1.0, top_p=1.0, H_bar=1.0, normalization="token", baseline="loo",
                  pathwise_term=True, tf_batch_size=64, chunk_tokens=7)
    fp32, _ = passes.x_gradient(model, params, rollout, **kwargs)
    bf16, _ = passes.x_gradient(model, params, rollout, autocast_dtype="bfloat16", **kwargs)
    num = sum(float(((fp32[k] - bf16[k]) ** 2).sum()) for k in fp32)
    den = sum(float((fp32[k] ** 2).sum()) for k in fp32)
    assert 0 < (num / den) ** 0.5 < 0.05  # bf16 changes the numbers, a little


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_chunked_directional_sums_equal_one_chunk(temperature, top_p):
    model = small_qwen2(tied=False)
    rollout, pad = sampled_rollout(model, B=4, G=2, temperature=temperature, top_p=top_p, seed=7)
    gen = torch.Generator().manual_seed(3)
    v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in model.named_parameters()}
    kwargs = dict(pad_token_id=pad, temperature=temperature, top_p=top_p, normalization="token", baseline="loo",
                  pathwise_term=True)
    one = passes.directional_sums(model, v, rollout, tf_batch_size=100, chunk_tokens=10**6, **kwargs)
    chunked = passes.directional_sums(model, v, rollout, tf_batch_size=3, chunk_tokens=4, **kwargs)
    for key in one:
        torch.testing.assert_close(chunked[key], one[key], atol=1e-6, rtol=1e-5)
    # and X·v from the reverse-mode pass agrees with the forward-mode sums
    params = parameters.select(model)
    S, T = one["S"].sum(), one["T"].sum()
    x, _ = passes.x_gradient(model, params, rollout, H_bar=float(S / T), tf_batch_size=3, chunk_tokens=5, **kwargs)
    n = one["P"].numel()
    estimate, _ = estimators.directional_estimate(one["P"], one["Q"], one["S"], one["T"], 2, "token")
    xv = sum(float((x[k] * v[k]).sum()) for k in x) / float(T)
    assert xv == pytest.approx(estimate, rel=1e-4, abs=1e-7 * n)


def reference_snis(model, direction, rollout, etas, pad, temperature, top_p):
    """The SNIS per-sequence quantities from full [n, T, V] logits at θ and each θ'."""
    batch = tf_layout.from_rollout(rollout, pad)
    scorer = teacher_force.ResponseLogits(model)
    args = (batch.input_ids, batch.attention_mask, batch.prompt_lens, batch.response_tokens.shape[1])
    valid = batch.response_mask
    with torch.no_grad():
        base = scorer(*args)
        nucleus = sort_nucleus(base, temperature, top_p)

        def sums(logits):
            lq = measure.log_q(logits, nucleus, temperature)
            token = torch.where(valid, lq.gather(-1, batch.response_tokens[..., None]).squeeze(-1), 0.0)
            h = torch.where(valid, measure.rb_entropy(lq, nucleus), 0.0)
            return token.double().sum(-1), h.double().sum(-1)

        base_lq, S = sums(base)
        out = {"log_w": [], "S_shifted": [], "own_nucleus_differs": []}
        for eta in etas:
            logits = torch.func.functional_call(scorer, {f"policy.{k}": t for k, t in parameters.shifted(model, direction, eta).items()}, args)
            lq, S_shifted = sums(logits)
            out["log_w"].append(lq - base_lq)
            out["S_shifted"].append(S_shifted)
            own = sort_nucleus(logits, temperature, top_p)
            out["own_nucleus_differs"].append(((own != nucleus).any(-1) & valid).any(-1))
    return {k: torch.stack(v) for k, v in out.items()} | {"S": S}


@pytest.mark.parametrize("temperature,top_p", SETTINGS)
def test_chunked_snis_pass_equals_unchunked(temperature, top_p):
    model = small_qwen2(tied=True)
    rollout, pad = sampled_rollout(model, B=4, G=3, temperature=temperature, top_p=top_p, seed=8)
    gen = torch.Generator().manual_seed(9)
    v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in model.named_parameters()}
    etas = [0.0, -0.01, 0.3]
    expected = reference_snis(model, v, rollout, etas, pad, temperature, top_p)
    for tf_batch_size, chunk in ((5, 4), (100, 10**6)):
        got = snis_pass.snis_pass(model, v, rollout, etas, pad_token_id=pad, temperature=temperature, top_p=top_p,
                             tf_batch_size=tf_batch_size, chunk_tokens=chunk)
        assert got["log_w"][0].abs().max() == 0.0  # η = 0: exactly θ
        for key in ("log_w", "S_shifted", "S"):
            torch.testing.assert_close(got[key], expected[key], atol=2e-5, rtol=1e-5)
        assert torch.equal(got["own_nucleus_differs"], expected["own_nucleus_differs"])
    if top_p < 1:
        assert expected["own_nucleus_differs"][2].any()  # the large step moves some nuclei
