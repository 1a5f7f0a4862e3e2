"""E batches on the embedded policy for the exact-enumeration tests of the fresh rollouts and of
the tempered_full entropy: prompts uniform over a handful (with replacement), G responses each,
and fixed random directions in parameter space."""
from __future__ import annotations

import torch

from entropy_probe import rewards, rollout

PROMPTS = [{"prompt": p, "answer": a} for p, a in [("3+5=", "8"), ("12+7=", "19"), ("9+9=", "18"), ("0+0=", "0")]]
MAX_NEW_TOKENS = 3
G = 4


def sample_batch(model, tokenizer, temperature, top_p, num_prompts=256, seed=0):
    """One E shard of ``num_prompts`` prompt groups (slots 0..n-1, noise seed ``seed``)."""
    ids = torch.randint(0, len(PROMPTS), (num_prompts,), generator=torch.Generator().manual_seed(seed)).tolist()
    return rollout.rollout_shard(
        model, tokenizer, PROMPTS, ids, G=G, kind="E", shard_index=0, slots=range(len(ids)), seed=seed,
        temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW_TOKENS, rollout_batch_size=1024,
        gen_batch_size=4096, reward_fn=rewards.exact_match,
    )


def direction(model, seed=123):
    """A random direction over every parameter (float64)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in model.named_parameters()}
