"""Numerical guards and provenance checks: bad values stop with a message naming them."""
from __future__ import annotations

import pytest
import torch

from entropy_probe import guards, shards
from entropy_probe.stages import inputs as stage_inputs


def test_non_finite_gradient_names_the_parameter():
    grads = {"a.weight": torch.ones(3), "b.bias": torch.tensor([1.0, float("nan")])}
    with pytest.raises(guards.NonFiniteError, match=r"shard_007.*'b.bias'"):
        guards.check_parameters(grads, "X gradient", "shard_007")


def test_non_finite_sequence_value_names_the_sequence():
    values = torch.zeros(5, 3)
    values[3, 1] = float("inf")
    with pytest.raises(guards.NonFiniteError, match="sequence 3"):
        guards.check_sequences(values, "entropy", "shard_001")
    guards.check_sequences(torch.zeros(5, 3), "entropy", "shard_001")  # finite: no error


def _rollout_like(tmp_path, **overrides):
    tensors = {"token_log_q": torch.zeros(2, 2, 3), "rb_entropies": torch.zeros(2, 2, 3),
               "tempered_entropies": torch.zeros(2, 2, 3), "rewards": torch.zeros(2, 2)}
    tensors.update(overrides)
    cfg = {"generation": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 3}, "batch_config": {"seed": 0, "G": 2},
           "model": {"precision": "float32"}}
    meta = stage_inputs.rollout_header(cfg, "E", "abc")
    path = tmp_path / "shard.safetensors"
    shards.write_shard(path, tensors, meta)
    return path, cfg


def test_rollout_with_nan_entropy_is_refused_on_read(tmp_path):
    bad = torch.zeros(2, 2, 3)
    bad[1, 0, 2] = float("nan")
    path, cfg = _rollout_like(tmp_path, rb_entropies=bad)
    with pytest.raises(guards.NonFiniteError, match=r"rb_entropies.*sequence 2"):
        stage_inputs.read_rollouts([path], cfg, "E", "abc")


def test_rollout_without_both_entropies_is_refused_on_read(tmp_path):
    """A shard written before the full tempered entropies were recorded names the file and the fix."""
    path, cfg = _rollout_like(tmp_path)
    tensors, meta = shards.read_shard(path)
    del tensors["tempered_entropies"]
    shards.write_shard(path, tensors, {k: v for k, v in meta.items() if k != "schema_version"})
    with pytest.raises(shards.ShardError, match=r"shard.safetensors.*'tempered_entropies'.*forcerun rollout"):
        stage_inputs.read_rollouts([path], cfg, "E", "abc")


def test_rollout_from_another_model_or_generation_config_is_refused(tmp_path):
    path, cfg = _rollout_like(tmp_path)
    assert stage_inputs.read_rollouts([path], cfg, "E", "abc")  # matching: accepted
    with pytest.raises(shards.ShardError, match=r"model_fingerprint.*'abc'.*'other'"):
        stage_inputs.read_rollouts([path], cfg, "E", "other")
    other = {**cfg, "generation": {**cfg["generation"], "top_p": 0.9}}
    with pytest.raises(shards.ShardError, match="generation"):
        stage_inputs.read_rollouts([path], other, "E", "abc")
    with pytest.raises(shards.ShardError, match="batch_kind"):
        stage_inputs.read_rollouts([path], cfg, "U", "abc")
    bf16 = {**cfg, "model": {"precision": "bfloat16"}}  # sampled in another precision: another q
    with pytest.raises(shards.ShardError, match="precision.*'float32'.*'bfloat16'"):
        stage_inputs.read_rollouts([path], bf16, "E", "abc")


def test_truncated_shard_is_reported_by_name(tmp_path):
    path, cfg = _rollout_like(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(shards.ShardError, match="shard.safetensors"):
        shards.read_shard(path)


def test_atomic_write_leaves_nothing_on_failure_and_clears_stale_temporaries(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with shards.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    stale = tmp_path / ".out.json.abc123.tmp"  # what a SIGKILLed writer leaves
    stale.write_text("half")
    shards.write_json(target, {"ok": 1})
    assert shards.read_json(target) == {"ok": 1} and not stale.exists()
