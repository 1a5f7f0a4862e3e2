"""Inputs, baselines and counters shared by the benchmarks (not tests: nothing here asserts).

- models: a mid-size random Qwen2 built from a ``Qwen2Config`` (no download), the embedded tiny
  policy (``entropy_probe.toy``), a Qwen2 at the Qwen2.5 vocabulary (151,936) for memory;
- synthetic rollout shards in the layout of ``entropy_probe.rollout`` (varied prompt and response
  lengths, so batching pays for its padding);
- the per-sequence loop baseline: one forward/backward per (prompt, response) pair through the
  model's own forward, computing the same X surrogate as the pass;
- FLOP counts (6·params·tokens + causal attention) and a measured matmul peak.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from entropy_probe import estimators, generate, measure, noise

# ---------------------------------------------------------------------------------------------
# models


@dataclass
class ModelSpec:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool = False
    logit_std: float = 4.0  # std of the random logits (a peaked, low-entropy policy, as after RL)


SIZES = {
    # CPU defaults: tens of millions of parameters, vocabulary 32k (d = 768: GPT-2-small widths)
    "mid": ModelSpec("qwen2-mid", 32_000, 768, 6, 12, 2, 2_048),
    "mid-quick": ModelSpec("qwen2-mid-quick", 32_000, 512, 4, 8, 2, 1_536),
    # Qwen2.5 vocabulary, for the memory comparison
    "vocab152k": ModelSpec("qwen2-v152k", 151_936, 512, 4, 8, 2, 1_536, tied=True),
    "vocab152k-quick": ModelSpec("qwen2-v152k", 151_936, 256, 2, 4, 2, 768, tied=True),
    # GPU: the Qwen2.5-0.5B shape (random weights)
    "large": ModelSpec("qwen2.5-0.5b-shape", 151_936, 896, 24, 14, 2, 4_864, tied=True),
    # a smoke run of the benchmark code itself (seconds)
    "smoke": ModelSpec("qwen2-smoke", 2_000, 64, 2, 4, 2, 128),
    "smoke-v152k": ModelSpec("qwen2-smoke-v152k", 151_936, 64, 1, 4, 2, 128, tied=True),
}


@dataclass
class Preset:
    """Sizes of one benchmark run: (prompts B, responses G, prompt width P, response width T)."""

    model: str
    x_batch: tuple[int, int, int, int]
    memory_model: str
    memory_batch: tuple[int, int, int]  # sequences, P, T
    generation: tuple[int, int, int, int]  # B, G, P, new tokens
    tiny_prompts: int
    decoding: tuple[tuple[int, int, int, int], ...] = ()  # (B, G, P, new tokens) per decoding row


PRESETS = {
    "default": Preset("mid", (4, 4, 64, 128), "vocab152k", (8, 64, 192), (4, 4, 32, 32), 64,
                      ((4, 4, 32, 32), (16, 4, 32, 32))),
    "quick": Preset("mid-quick", (2, 4, 64, 128), "vocab152k-quick", (8, 64, 192), (2, 4, 32, 16), 32,
                    ((4, 4, 32, 16),)),
    "large": Preset("large", (16, 4, 192, 512), "large", (16, 128, 384), (8, 4, 64, 64), 64,
                    ((16, 4, 128, 128), (64, 4, 128, 128), (256, 4, 128, 128))),
    "smoke": Preset("smoke", (2, 2, 8, 8), "smoke-v152k", (4, 8, 8), (2, 2, 4, 4), 4, ((2, 2, 4, 4),)),
}


def build_qwen2(spec: ModelSpec, device: str = "cpu", seed: int = 0):
    """A random Qwen2ForCausalLM in eval mode, fp32. The output embedding is rescaled so that
    the logits have std ``spec.logit_std`` (a random init gives near-uniform next-token
    distributions, unlike any trained policy; the nucleus at top_p < 1 would hold most of the
    vocabulary)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=spec.vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, intermediate_size=spec.intermediate,
        max_position_embeddings=4096, tie_word_embeddings=spec.tied, bos_token_id=None, pad_token_id=None,
        eos_token_id=spec.vocab - 1, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        if not spec.tied:
            head.mul_(spec.logit_std / (head.std() * spec.hidden ** 0.5))
        else:  # tied: the input embedding keeps its rows' directions; scale both alike
            head.mul_(spec.logit_std / (head.std() * spec.hidden ** 0.5))
    model.eval()
    return model


def build_tiny(out_dir):
    """The embedded tiny policy (trained a few seconds on the CPU) and its tokenizer."""
    from entropy_probe import models
    from entropy_probe.toy import build_embedded_policy

    build_embedded_policy(out_dir, seed=0)
    return models.load_policy(out_dir, "float32", "cpu"), models.load_tokenizer(out_dir)


def matmul_params(model) -> tuple[int, int]:
    """(decoder matmul parameters, output-embedding parameters): the weights of every matrix
    product a token goes through. The input embedding is a lookup and is not counted."""
    decoder = sum(p.numel() for n, p in model.get_decoder().named_parameters() if p.ndim == 2 and "embed" not in n)
    head = model.get_output_embeddings().weight.numel()
    return decoder, head


# ---------------------------------------------------------------------------------------------
# rollouts


def synthetic_rollout(model, *, B: int, G: int, P: int, T: int, seed: int = 0, top_p: float = 1.0,
                      temperature: float = 1.0, min_fraction: float = 0.5, pad_token_id: int | None = None,
                      eos_token_id: int | None = None) -> dict[str, Tensor]:
    """A rollout shard (``entropy_probe.rollout`` layout) of B prompts × G responses with prompt
    lengths in [min_fraction·P, P] and response lengths in [min_fraction·T, T].

    With top_p = 1 the response tokens are drawn uniformly (every token lies in the nucleus);
    with top_p < 1 they are sampled from q with :func:`entropy_probe.generate.sample` (so every
    token lies in its nucleus) and then cut to the drawn lengths."""
    V = model.config.vocab_size
    pad = V - 2 if pad_token_id is None else pad_token_id
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(int(min_fraction * P), P + 1, (B,), generator=g)
    response_lens = torch.randint(int(min_fraction * T), T + 1, (B, G), generator=g)
    prompt_tokens = torch.randint(0, V - 2, (B, P), generator=g)
    prompt_mask = (torch.arange(P)[None, :] >= (P - prompt_lens)[:, None]).long()
    prompt_tokens = torch.where(prompt_mask.bool(), prompt_tokens, pad)
    if top_p >= 1.0:
        responses = torch.randint(0, V - 2, (B * G, T), generator=g)
    else:
        device = next(model.parameters()).device
        out = generate.sample(model, prompt_tokens.to(device), prompt_mask.to(device), G, temperature=temperature,
                              top_p=top_p, max_new_tokens=T, eos_token_id=-1, pad_token_id=pad,
                              noise_key=noise.NoiseKey(seed, noise.STREAM_E), slots=range(B))
        responses = out.response_tokens
        responses = torch.nn.functional.pad(responses, (0, T - responses.shape[1]), value=pad)
    lens = response_lens.reshape(-1)
    valid = torch.arange(T)[None, :] < lens[:, None]
    responses = torch.where(valid, responses, pad)
    sequences = torch.cat([prompt_tokens.repeat_interleave(G, 0), responses], 1).view(B, G, P + T)
    masks = torch.cat([prompt_mask.repeat_interleave(G, 0), valid.long()], 1).view(B, G, P + T)
    entropies = torch.where(valid, torch.rand(B * G, T, generator=g) * 2, 0.0).view(B, G, T)
    rewards = (torch.rand(B, G, generator=g) < 0.5).float()
    return {
        "sequences": sequences, "attention_masks": masks, "prompt_lens": prompt_lens,
        "response_lens": response_lens, "max_lengths": response_lens.max(-1).values,
        "rewards": rewards,
        "token_log_q": torch.zeros(B, G, T), "rb_entropies": entropies,
    }


def sampled_shard(model, prompt_ids: Tensor, prompt_mask: Tensor, G: int, T: int, *, seed: int, stream: str = "E",
                  temperature: float = 1.0, top_p: float = 1.0, autocast_dtype=None) -> dict[str, Tensor]:
    """A rollout shard (``entropy_probe.rollout`` layout, no rewards) of left-padded prompts
    ``[B, P]`` sampled from q by :func:`entropy_probe.generate.sample`: G responses each of at most
    T tokens (EOS = V − 1), slot b keyed by (seed, stream, b), with the sampling-time log q and
    RB entropies — what the rollout stage stores."""
    V = model.config.vocab_size
    pad, eos = V - 2, V - 1
    B, P = prompt_ids.shape
    device = next(model.parameters()).device
    out = generate.sample(model, prompt_ids.to(device), prompt_mask.to(device), G, temperature=temperature, top_p=top_p,
                          max_new_tokens=T, eos_token_id=eos, pad_token_id=pad,
                          noise_key=noise.NoiseKey(seed, noise.STREAMS[stream]), slots=range(B),
                          autocast_dtype=autocast_dtype)
    width = out.response_tokens.shape[1]
    fill = lambda x, v: torch.nn.functional.pad(x, (0, T - width), value=v)  # noqa: E731
    valid = (torch.arange(T)[None, :] < out.response_lens[:, None]).long()
    sequences = torch.cat([prompt_ids.cpu().repeat_interleave(G, 0), fill(out.response_tokens, pad)], 1)
    masks = torch.cat([prompt_mask.cpu().repeat_interleave(G, 0), valid], 1)
    return {
        "sequences": sequences.view(B, G, P + T), "attention_masks": masks.view(B, G, P + T),
        "prompt_lens": prompt_mask.sum(-1).cpu(), "response_lens": out.response_lens.view(B, G),
        "token_log_q": fill(out.token_log_q, 0.0).view(B, G, T), "rb_entropies": fill(out.entropies, 0.0).view(B, G, T),
        "tempered_entropies": fill(out.tempered_entropies, 0.0).view(B, G, T),
        "stop_reason": out.stop_reason.view(B, G), "prompt_ids": torch.arange(B),
    }


def tiny_rollout(model, tokenizer, *, B: int, G: int, seed: int = 0, top_p: float = 1.0, temperature: float = 1.0):
    """An E shard of the embedded policy sampled as the workflow does."""
    from entropy_probe import rewards, rollout
    from entropy_probe.toy import arithmetic_examples

    examples = arithmetic_examples(19)
    ids = torch.randint(0, len(examples), (B,), generator=torch.Generator().manual_seed(seed)).tolist()
    return rollout.rollout_shard(
        model, tokenizer, examples, ids, G=G, kind="E", shard_index=0, slots=range(len(ids)), seed=seed, temperature=temperature,
        top_p=top_p, max_new_tokens=3, rollout_batch_size=1024, gen_batch_size=4096,
        reward_fn=rewards.exact_match,
    )


def grpo_numerators(rollout: dict[str, Tensor]) -> Tensor:
    """The per-response numerators a_i of the GRPO objective (entropy_probe.losses) for a Y pass."""
    from entropy_probe import losses

    advantages = losses.group_advantages(rollout["rewards"], "none")
    return losses.response_weights("grpo", advantages, rollout["response_lens"])[0]


def token_counts(rollout: dict[str, Tensor]) -> tuple[int, int, Tensor]:
    """(decoder tokens Σ(prompt + response), response tokens ΣT, per-sequence lengths L_i)."""
    G = rollout["response_lens"].shape[1]
    lengths = rollout["prompt_lens"].repeat_interleave(G) + rollout["response_lens"].reshape(-1)
    return int(lengths.sum()), int(rollout["response_lens"].sum()), lengths


def train_flops(model, rollout: dict[str, Tensor]) -> float:
    """Forward + backward FLOPs of one pass over the real (unpadded) tokens: 6 × matmul params ×
    tokens (decoder weights on every token, the output embedding on response tokens only) plus
    causal attention, 6 · layers · d_attn · Σ L_i² (fwd 2·L²·d per layer for QKᵀ and AV with
    half the entries masked, backward twice that)."""
    decoder, head = matmul_params(model)
    tokens, response_tokens, lengths = token_counts(rollout)
    cfg = model.config
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", None) if getattr(cfg, "head_dim", None) else cfg.hidden_size
    attention = 6 * cfg.num_hidden_layers * d_attn * float((lengths.double() ** 2).sum())
    return 6.0 * (decoder * tokens + head * response_tokens) + attention


# ---------------------------------------------------------------------------------------------
# the per-sequence loop baselines


def _sequence(rollout, i: int, G: int):
    b, g = divmod(i, G)
    P = rollout["sequences"].shape[-1] - rollout["token_log_q"].shape[-1]
    p_len, r_len = int(rollout["prompt_lens"][b]), int(rollout["response_lens"][b, g])
    seq = rollout["sequences"][b, g]
    prompt = seq[P - p_len:P]
    response = seq[P:P + r_len]
    return prompt, response


def per_sequence_x_gradient(model, params, rollout, *, temperature, top_p, H_bar, normalization="token",
                            baseline="loo", pathwise_term=True) -> dict[str, Tensor]:
    """The X surrogate Σ_k [h_k + w_k log q_k] of each response, one forward/backward per
    sequence through ``model(...)`` (``logits_to_keep``: logits of the response positions only),
    gradients summed in float64."""
    B, G, _ = rollout["rb_entropies"].shape
    coefs = estimators.x_coefficients(rollout["rb_entropies"], rollout["response_lens"], H_bar, normalization,
                                      baseline, pathwise_term)
    device = next(model.parameters()).device
    total = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    for i in range(B * G):
        prompt, response = _sequence(rollout, i, G)
        ids = torch.cat([prompt, response])[None].to(device)
        logits = model(input_ids=ids, logits_to_keep=len(response) + 1).logits[0, :-1]
        lq, h, _ = measure.score_tokens(logits, response.to(device), temperature, top_p)
        row = estimators.XCoefficients(
            entropy=None if coefs.entropy is None else coefs.entropy[i:i + 1, :len(response)].to(device),
            log_q=coefs.log_q[i:i + 1, :len(response)].to(device))
        estimators.surrogate_value(row, h[None], lq[None]).backward()
        for k, p in params.items():
            if p.grad is not None:
                total[k] += p.grad.double()
                p.grad = None
    return total


def max_relative_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all parameters (float64)."""
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b)
    den = sum(float((b[k].double() ** 2).sum()) for k in b)
    return (num / max(den, 1e-300)) ** 0.5


# ---------------------------------------------------------------------------------------------
# timing and peaks


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


CLOCK = {"name": "wall"}  # "wall" (perf_counter) or "cpu" (process CPU time, all threads)


def now() -> float:
    return time.process_time() if CLOCK["name"] == "cpu" else time.perf_counter()


def timed(fn, device="cpu", repeats: int = 1, warmup: int = 0):
    """(best seconds over ``repeats`` calls after ``warmup`` calls, last result), on the clock
    of ``CLOCK``: wall time, or the process's CPU time (on a shared machine, time spent
    descheduled does not count; spinning threads do)."""
    result = None
    for _ in range(warmup):
        result = fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = now()
        result = fn()
        synchronize(device)
        best = min(best, now() - start)
    return best, result


PEAK_SIZE = {"n": None}  # the peak's matrix size when set (a smoke run: small, so that bf16 on a CPU is quick)


def matmul_peak(device="cpu", dtype=torch.float32, n: int | None = None, repeats: int = 5) -> float:
    """Measured FLOP/s of a square matrix product (best of ``repeats``), the reference peak."""
    n = n or PEAK_SIZE["n"] or (2048 if torch.device(device).type == "cpu" else 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds, _ = timed(lambda: a @ b, device, repeats=repeats, warmup=2)
    return 2.0 * n ** 3 / seconds


def memory_bandwidth(device="cpu", megabytes: int = 512, repeats: int = 5) -> float:
    """Measured bytes/s of a large tensor copy (read + write), best of ``repeats``: the
    bandwidth a memory-bound decoding step can use."""
    n = megabytes * 2**20 // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    seconds, _ = timed(lambda: b.copy_(a), device, repeats=repeats, warmup=1)
    return 2 * a.numel() * 4 / seconds


def decoding_bounds(model, rows: int, prompt_width: int, new_tokens: int, bytes_per_value: int, bandwidth: float,
                    peak_flops: float) -> dict:
    """Roofline of one batched decoding call: per step, every weight is read once (at
    ``bytes_per_value``) plus the KV cache of every row at its average context length, and every
    row costs 2·matmul params + causal attention FLOPs. Tokens/s bounds from the bandwidth, from
    the compute peak, and their minimum (the roofline). The sampler's own work (nucleus, noise)
    is not in it: the gap to the bound includes it."""
    cfg = model.config
    decoder, head = matmul_params(model)
    params = sum(p.numel() for p in model.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    context = prompt_width + new_tokens / 2  # average over the steps
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * rows * bytes_per_value
    step_bytes = params * bytes_per_value + kv_bytes
    step_flops = rows * (2 * (decoder + head) + 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * context)
    by_bandwidth = rows * bandwidth / step_bytes
    by_compute = rows * peak_flops / step_flops
    return {"step_bytes": step_bytes, "step_flops": step_flops, "tokens_per_s_bandwidth": by_bandwidth,
            "tokens_per_s_compute": by_compute, "tokens_per_s_roofline": min(by_bandwidth, by_compute)}

