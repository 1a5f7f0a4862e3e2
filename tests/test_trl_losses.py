"""The probe's GRPO objective (``entropy_probe.losses``) against TRL 1.16's own loss and
advantages on one fixed U batch (DESIGN §2b), and against verl's ``agg_loss`` formulas written out.

Y from the registry is ∇ Σ_i c_i Σ_k log p_ik by plain autograd (and, for the loss types the
sharded pipeline runs, by the project's ``passes.y_gradient``); Y from TRL is −∇ of
``GRPOTrainer.compute_loss`` over the batch's micro-batches (tests/trl_harness.py).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

import trl_harness as H  # noqa: E402
from entropy_probe import losses, parameters, passes  # noqa: E402

G = 4
SEED = 4  # a batch with responses of 2 and 3 tokens in a group, a zero-std group, mixed prompt lengths
TRL_LOSS_TYPES = ("grpo", "dapo", "bnpo", "dr_grpo")
TOL = 1e-5


@pytest.fixture(scope="module")
def u_batch(toy_policy_dir, tmp_path_factory):
    """(inputs, B): one generation batch as TRL builds it, advantages scaled per group."""
    trainer = H.make_trainer(toy_policy_dir, tmp_path_factory.mktemp("trl_u"), scale_rewards="group")
    inputs = H.generate_batch(trainer, H.toy_rows(toy_policy_dir), seed=SEED)
    lens = H.lengths(inputs, G)
    assert len(set(lens.flatten().tolist())) > 1 and (lens.max(-1).values != lens.min(-1).values).any()
    assert (inputs["prompt_mask"] == 0).any()  # left-padded prompts
    return inputs, lens.shape[0]


def _coefficients(loss_type, inputs, B, num_micro_batches):
    return losses.response_coefficients(
        loss_type, inputs["advantages"].view(B, G), H.lengths(inputs, G),
        max_completion_length=H.MAX_COMPLETION_LENGTH, micro_batch_size=B * G // num_micro_batches)


def _assert_close(actual: dict, expected: dict, tol: float = TOL):
    assert H.relative_error(actual, expected) < tol
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=tol, atol=tol * float(value.abs().max()))


@pytest.mark.parametrize("num_micro_batches", [1, 2])
@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_registry_gradient_equals_trl_loss_gradient(toy_policy_dir, tmp_path, u_batch, loss_type, num_micro_batches):
    inputs, B = u_batch
    trainer = H.make_trainer(toy_policy_dir, tmp_path, loss_type=loss_type,
                             gradient_accumulation_steps=num_micro_batches,
                             per_device_train_batch_size=B * G // num_micro_batches)
    trl_y = H.trl_loss_gradient(trainer, inputs, num_micro_batches)
    coef = _coefficients(loss_type, inputs, B, num_micro_batches)
    _assert_close(H.objective_gradient(trainer.model, inputs, coef.reshape(-1), H.TEMPERATURE), trl_y)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_project_y_pass_equals_trl_loss_gradient(toy_policy_dir, tmp_path, u_batch, loss_type):
    """passes.y_gradient (the workflow's Y, right-padded layout, two shards, numerators a_i of the
    whole U batch) / Σ z = TRL's Y."""
    inputs, B = u_batch
    trainer = H.make_trainer(toy_policy_dir, tmp_path, loss_type=loss_type)
    trl_y = H.trl_loss_gradient(trainer, inputs, 1)
    rollout = H.to_rollout(inputs, G)
    numerators, terms = losses.response_weights(loss_type, inputs["advantages"].view(B, G), H.lengths(inputs, G),
                                                max_completion_length=H.MAX_COMPLETION_LENGTH)
    params = parameters.select(trainer.model)
    total = {}
    for shard in (slice(0, 1), slice(1, B)):
        grads = passes.y_gradient(
            trainer.model, params, {k: v[shard] for k, v in rollout.items()}, numerators[shard],
            pad_token_id=trainer.processing_class.pad_token_id, temperature=H.TEMPERATURE, tf_batch_size=5)
        total = {k: total.get(k, 0) + g for k, g in grads.items()}
    _assert_close({k: g / float(terms.sum()) for k, g in total.items() if k in trl_y}, trl_y)


def test_micro_batch_split_and_constant_normalizers_are_visible(u_batch):
    """Negative controls: the tests above can tell the normalizations apart on this batch."""
    inputs, B = u_batch
    A, T = inputs["advantages"].view(B, G), H.lengths(inputs, G)
    pairs = [(_coefficients("bnpo", inputs, B, 2), _coefficients("dapo", inputs, B, 2)),
             (_coefficients("grpo", inputs, B, 1), _coefficients("dapo", inputs, B, 1)),
             (_coefficients("dr_grpo", inputs, B, 1),
              losses.response_coefficients("seq_mean_token_sum_prompt_max_len", A, T))]
    for a, b in pairs:
        assert float((a - b).abs().max()) > 1e-3 * float(b.abs().max())


@pytest.mark.parametrize("scale", ["none", "group", "batch"])
def test_group_advantages_equal_trl(toy_policy_dir, tmp_path, scale):
    trainer = H.make_trainer(toy_policy_dir, tmp_path, scale_rewards=scale)
    inputs = H.generate_batch(trainer, H.toy_rows(toy_policy_dir), seed=SEED)
    rewards = inputs["_rewards"].view(-1, G)
    assert rewards.std(-1).eq(0).any() and rewards.std(-1).gt(0).any()
    expected = inputs["advantages"].double().view(-1, G)
    torch.testing.assert_close(losses.group_advantages(rewards, scale), expected, rtol=1e-5, atol=1e-6)
    if scale != "none":  # the std is Bessel-corrected, as TRL's nanstd
        biased = rewards.std(-1, correction=0, keepdim=True) if scale == "group" else rewards.std(correction=0)
        assert not torch.allclose((rewards - rewards.mean(-1, keepdim=True)) / (biased + 1e-4), expected, atol=1e-3)


# ------------------------------------------------------------------------------ verl's agg_loss


def _verl_agg_loss(loss_mat, loss_mask, mode, loss_scale_factor):
    """verl ``core_algos.agg_loss`` for one data-parallel rank whose micro-batch is the whole
    mini-batch (global token count and batch size = this batch's), written out;
    seq-mean-token-sum-norm as DESIGN §2b (and verl's agg_loss with a loss_scale_factor):
    Σ_i Σ_k / loss_scale_factor, no mean over sequences."""
    if mode == "token-mean":
        return (loss_mat * loss_mask).sum() / loss_mask.sum()
    if mode == "seq-mean-token-sum-norm":
        return (loss_mat * loss_mask).sum() / loss_scale_factor
    seq_tokens = loss_mask.sum(-1)
    seq_mask = (seq_tokens > 0).float()
    if mode == "seq-mean-token-mean":
        seq_losses = (loss_mat * loss_mask).sum(-1) / (seq_tokens + 1e-8)
        return (seq_losses * seq_mask).sum() / seq_mask.sum()
    return ((loss_mat * loss_mask).sum(-1) * seq_mask).sum() / seq_mask.sum()


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_registry_gradient_equals_verl_agg_loss(toy_model, u_batch, mode):
    """verl's vanilla PPO loss on-policy: pg_loss = −A · exp(log p − sg(log p)), aggregated."""
    model, _ = toy_model
    inputs, B = u_batch
    factor = 7.0
    model.zero_grad(set_to_none=True)
    lp = H.token_log_probs(model, inputs, H.TEMPERATURE)
    mask = inputs["completion_mask"].float()
    pg_loss = -inputs["advantages"][:, None] * torch.exp(lp - lp.detach())
    (-_verl_agg_loss(pg_loss, mask, mode, factor)).backward()
    verl_y = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}
    coef = losses.response_coefficients(mode, inputs["advantages"].view(B, G), H.lengths(inputs, G),
                                        loss_scale_factor=factor)
    _assert_close(H.objective_gradient(model, inputs, coef.reshape(-1), H.TEMPERATURE), verl_y)


# ------------------------------------------------------------------------ the registry by itself


def _example():
    A = torch.tensor([[1.0, -1.0, 0.5], [0.2, -0.4, 0.2]])
    T = torch.tensor([[2, 5, 1], [3, 3, 4]])
    return A, T


SETTINGS = {"max_completion_length": 6, "loss_scale_factor": 3.0, "micro_batch_size": 3}


def test_aliases_name_identical_objectives():
    A, T = _example()
    for group in (("grpo", "seq-mean-token-mean", "seq_mean_token_mean"), ("dapo", "token-mean", "token_mean")):
        first = losses.response_coefficients(group[0], A, T)
        for name in group[1:]:
            assert torch.equal(losses.response_coefficients(name, A, T), first)
    described = [name for names, _ in losses.describe_loss_types() for name in names.split(" = ")]
    assert sorted(described) == sorted(losses.NAMES)
    assert "seq_mean_token_sum_max_len" not in losses.NAMES


def test_per_prompt_max_len_variant():
    A, T = _example()
    c = losses.response_coefficients("seq_mean_token_sum_prompt_max_len", A, T)
    torch.testing.assert_close(c, A.double() / (2 * 3 * torch.tensor([[5.0], [4.0]], dtype=torch.float64)))


@pytest.mark.parametrize("loss_type,key", [("dr_grpo", "update.max_completion_length"),
                                           ("seq-mean-token-sum-norm", "update.loss_scale_factor"),
                                           ("bnpo", "update.micro_batch_size")])
def test_missing_setting_names_the_config_key(loss_type, key):
    A, T = _example()
    assert losses.required_settings(loss_type) == (key,)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        losses.response_coefficients(loss_type, A, T)
    with pytest.raises(ValueError, match="micro_batch_size"):
        losses.response_coefficients("bnpo", A, T, micro_batch_size=4)  # 6 responses: unequal micro-batches
    with pytest.raises(ValueError, match="unknown loss type"):
        losses.response_coefficients("seq_mean_token_sum_max_len", A, T)


@pytest.mark.parametrize("loss_type", sorted(losses.LOSS_TYPES))
def test_numerators_split_over_shards(loss_type):
    """Every loss type but bnpo is separable: a shard's (a, z) computed alone equal its rows of the
    whole batch's, so shards can sum a_i ∇ℓ_i and the reduction divides by Σ z once. bnpo's a
    depends on the micro-batch split, which spans shards: it is computed over the whole U batch
    (the u_objective stage)."""
    A, T = _example()
    settings = {key: SETTINGS[key] for key in (k.split(".")[1] for k in losses.required_settings(loss_type))}
    a, z = losses.response_weights(loss_type, A, T, **settings)
    torch.testing.assert_close(a / z.sum(), losses.response_coefficients(loss_type, A, T, **settings))
    if loss_type == "bnpo":
        return
    parts = [losses.response_weights(loss_type, A[i:i + 1], T[i:i + 1], **settings) for i in range(2)]
    if loss_type == "seq_mean_token_sum_norm":  # a constant normalizer: each part claims a share of it
        assert float(sum(zi.sum() for _, zi in parts)) == pytest.approx(2 * float(z.sum()))
    else:
        torch.testing.assert_close(torch.cat([zi for _, zi in parts]), z)
    torch.testing.assert_close(torch.cat([ai for ai, _ in parts]), a)


def test_group_advantages_single_response_and_bool():
    r = torch.tensor([[1.0], [0.0]])
    for scale in ("none", "group", "batch", True, False):
        out = losses.group_advantages(r, scale)
        assert torch.equal(out, torch.zeros(2, 1))
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert torch.equal(losses.group_advantages(r, True), losses.group_advantages(r, "group"))
    with pytest.raises(ValueError, match="scale_rewards"):
        losses.group_advantages(r, "std")
