"""Benchmarks of the sampler and of the fresh rollouts (run by benchmarks/run.py, not tests).

  sampler   the sampler's share of a decoding step at the Qwen2.5 vocabulary (151,936): the time
            inside the logits processor (nucleus, log q, both entropies, the Gumbel noise and
            its argmax) against the whole generate.sample call, top_p 0.95 and 1
  fresh     the fresh-rollout pass of one E shard by verification against full regeneration:
            wall time and tokens generated one by one at each η of the default sweep and at
            larger η, along v = ∇ (token-mean log q of the shard's responses)
"""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

import workloads as W
from entropy_probe import fresh_pass, generate, noise

DEFAULT_ETAS = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text())["estimator"]["eta_list"]


def bench_sampler(args, row):
    """Target: the sampler ≤ 0.3 of a decoding step."""
    spec = W.SIZES[args.preset.memory_model]
    model = W.build_qwen2(spec, args.device)
    B, G, P, T = args.preset.decoding[0]
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, spec.vocab - 2, (B, P), generator=g)
    mask = torch.ones_like(prompts)
    inside = {"seconds": 0.0}
    plain_call = generate.SamplingMeasureProcessor.__call__

    def timed_call(self, input_ids, scores):
        W.synchronize(args.device)
        start = time.perf_counter()
        out = plain_call(self, input_ids, scores)
        W.synchronize(args.device)
        inside["seconds"] += time.perf_counter() - start
        return out

    settings = [(0.95, generate._NOISE_BLOCK_ELEMENTS_CPU), (1.0, generate._NOISE_BLOCK_ELEMENTS_CPU)]
    if args.device == "cpu":  # the baseline: dense noise in blocks of 2^24 elements (the GPU size) on the CPU too
        settings.append((1.0, generate._NOISE_BLOCK_ELEMENTS))
    chosen_block = generate._NOISE_BLOCK_ELEMENTS_CPU
    for top_p, block in settings:
        def call():
            inside["seconds"] = 0.0
            generate.sample(model, prompts, mask, G, temperature=1.0, top_p=top_p, max_new_tokens=T,
                            eos_token_id=-1, pad_token_id=spec.vocab - 2, noise_key=noise.NoiseKey(0, noise.STREAM_E),
                            slots=range(B))
            return inside["seconds"]

        generate.SamplingMeasureProcessor.__call__ = timed_call
        generate._NOISE_BLOCK_ELEMENTS_CPU = block
        try:
            seconds, sampler_seconds = W.timed(call, args.device, repeats=1, warmup=1)
        finally:
            generate.SamplingMeasureProcessor.__call__ = plain_call
            generate._NOISE_BLOCK_ELEMENTS_CPU = chosen_block
        share = sampler_seconds / seconds
        blocks = f", CPU noise blocks 2^{block.bit_length() - 1}" if args.device == "cpu" else ""
        row("sampler", f"{spec.name} V={spec.vocab:,}, {B * G} rows, P={P}, {T} steps, top_p {top_p}{blocks}",
            f"{1e3 * sampler_seconds / T:,.1f} ms/step", f"{1e3 * seconds / T:,.1f} ms/step", share, "≤ 0.3",
            share <= 0.3, seconds=seconds, sampler_seconds=sampler_seconds)


def bench_fresh(args, setup, row):
    """Verification against regeneration on the mid-size model; no target (the saving depends on
    how many responses change, i.e. on η)."""
    spec, model, _, _, _ = setup
    B, G, P, T = args.preset.decoding[0]
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, spec.vocab - 2, (B, P), generator=g)
    shard = W.sampled_shard(model, prompts, torch.ones_like(prompts), G, T, seed=0, top_p=0.95)
    tokenizer = SimpleNamespace(pad_token_id=spec.vocab - 2, eos_token_id=spec.vocab - 1)
    direction = log_likelihood_gradient(model, shard)
    for eta in DEFAULT_ETAS + [1e-2, 1e-1]:
        runs = {}
        for method in ("verification", "regeneration"):
            def call():
                return fresh_pass.fresh_rollout_shard(
                    model, tokenizer, shard, direction, eta, slots=range(B), seed=0, temperature=1.0, top_p=0.95,
                    max_new_tokens=T, gen_batch_size=4096, method=method, tf_batch_size=64)
            runs[method] = W.timed(call, args.device, repeats=1, warmup=0)
        (v_s, (v_out, v_cost)), (r_s, (r_out, r_cost)) = runs["verification"], runs["regeneration"]
        same = torch.equal(v_out["response_tokens"], r_out["response_tokens"])
        row("fresh", f"{spec.name}, {B * G} rows, {T} tokens, η={eta:g}: {int(v_out['changed'].sum())} changed",
            f"{v_s:,.2f} s, {v_cost['generated_tokens']:,} generated", f"{r_s:,.2f} s, {r_cost['generated_tokens']:,} generated",
            r_s / v_s, same_sample=same, verification=v_cost, regeneration=r_cost, verification_s=v_s,
            regeneration_s=r_s)


def log_likelihood_gradient(model, shard) -> dict[str, torch.Tensor]:
    """∇θ of the token-mean log-likelihood of the shard's responses (float64): a direction of the
    size of a policy-gradient step's."""
    from entropy_probe import tf_layout

    batch = tf_layout.from_rollout(shard, model.config.vocab_size - 2)
    device = next(model.parameters()).device
    logits = model(input_ids=batch.input_ids.to(device)).logits.float()
    rows, cols, tokens = tf_layout.valid_pairs(batch, device)
    positions = batch.prompt_lens.to(device)[rows] - 1 + cols
    log_p = torch.log_softmax(logits[rows, positions], -1).gather(-1, tokens[:, None]).mean()
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(log_p, params)
    return {n: gr.detach().double() for n, gr in zip(names, grads)}
