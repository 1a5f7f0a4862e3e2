"""A readable text summary of one rollout shard: metadata, tensors, a few decoded responses and
the batch statistics a person checks first (lengths, EOS stops, rewards, entropies under q).

Shards are read only through :func:`entropy_probe.shards.read_shard`. Sections that need a tensor
the shard does not hold are skipped, so any shard written by :mod:`entropy_probe.shards` prints.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from .shards import read_shard

_ROLLOUT_KEYS = ("sequences", "attention_masks", "response_lens", "token_log_q", "rb_entropies")


def _fmt(value) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def _tokens_text(ids: list[int], tokenizer) -> str:
    """Decoded text (special tokens shown, so EOS is visible) or the raw ids."""
    if tokenizer is None:
        return str(ids)
    return repr(tokenizer.decode(ids, skip_special_tokens=False))


def _legend(meta: dict, key: str) -> dict[int, str]:
    """Code -> name of a per-response code tensor, from the legend in the shard's metadata
    (``stop_reasons``; ``reward.codes``)."""
    legend = meta.get("stop_reasons") if key == "stop_reason" else (meta.get("reward") or {}).get("codes")
    return {int(code): name for code, name in (legend or {}).items()}


def rollout_statistics(tensors: dict[str, Tensor], meta: dict | None = None) -> dict[str, float]:
    """Batch statistics of a rollout shard (float64 sums over all response tokens):

    - ``mean_rb_entropy_per_token`` = Σ h_k / Σ T  (nats per token under q),
    - ``mean_log_q_per_token`` = Σ log q_k(y_k) / Σ T,
    - ``mean_rb_entropy_per_sequence`` = mean_i S_i, ``mean/min/max_response_len``,
    - ``eos_stop_share`` (responses that emitted EOS), ``mean_reward``,
    - ``varying_reward_group_share`` (prompt groups whose G rewards are not all equal: the only
      groups with a non-zero GRPO advantage),
    - with the legends of ``meta``: ``stop_share/<reason>`` (eos, stop_string, max_new_tokens) and
      ``reward_outcome_share/<outcome>`` (pass, wrong_answer, no_answer, ...).
    """
    lens = tensors["response_lens"].double()
    total_tokens = lens.sum().clamp(min=1.0)
    stats = {
        "num_prompts": float(lens.shape[0]),
        "num_responses": float(lens.numel()),
        "mean_response_len": lens.mean().item(),
        "min_response_len": lens.min().item(),
        "max_response_len": lens.max().item(),
        "mean_rb_entropy_per_token": (tensors["rb_entropies"].double().sum() / total_tokens).item(),
        "mean_rb_entropy_per_sequence": tensors["rb_entropies"].double().sum(-1).mean().item(),
        "mean_log_q_per_token": (tensors["token_log_q"].double().sum() / total_tokens).item(),
    }
    if "stopped_at_eos" in tensors:
        stats["eos_stop_share"] = tensors["stopped_at_eos"].double().mean().item()
    if "rewards" in tensors:
        rewards = tensors["rewards"].double()
        stats["mean_reward"] = rewards.mean().item()
        varying = (rewards != rewards[..., :1]).any(-1)
        stats["varying_reward_group_share"] = varying.double().mean().item()
    for key, prefix in (("stop_reason", "stop_share"), ("reward_codes", "reward_outcome_share")):
        if key in tensors:
            for code, name in _legend(meta or {}, key).items():
                stats[f"{prefix}/{name}"] = (tensors[key] == code).double().mean().item()
    return stats


def _example_lines(tensors: dict[str, Tensor], meta: dict, tokenizer, n_examples: int) -> list[str]:
    sequences, masks = tensors["sequences"], tensors["attention_masks"]
    B, G, L = sequences.shape
    T = tensors["token_log_q"].shape[-1]
    P = L - T
    lines = []
    for flat in range(min(n_examples, B * G)):
        b, g = divmod(flat, G)
        if g == 0 or flat == 0:
            prompt = sequences[b, g, :P][masks[b, g, :P].bool()].tolist()
            pid = f" (dataset id {tensors['prompt_ids'][b].item()})" if "prompt_ids" in tensors else ""
            lines.append(f"prompt {b}{pid}: {_tokens_text(prompt, tokenizer)}")
        n = int(tensors["response_lens"][b, g])
        response = sequences[b, g, P:P + n].tolist()
        fields = [f"len {n}"]
        stops = _legend(meta, "stop_reason")
        if "stop_reason" in tensors and stops:
            fields.append(f"stop: {stops[int(tensors['stop_reason'][b, g])]}")
        elif "stopped_at_eos" in tensors:
            fields.append("EOS" if tensors["stopped_at_eos"][b, g] else "no EOS (cut at max_new_tokens)")
        if "rewards" in tensors:
            outcomes = _legend(meta, "reward_codes")
            outcome = f" ({outcomes[int(tensors['reward_codes'][b, g])]})" if "reward_codes" in tensors and outcomes else ""
            fields.append(f"reward {tensors['rewards'][b, g].item():.4g}{outcome}")
        if "advantages" in tensors:
            fields.append(f"advantage {tensors['advantages'][b, g].item():+.4g}")
        fields.append(f"S = Σh {tensors['rb_entropies'][b, g, :n].double().sum().item():.4f}")
        fields.append(f"log q(y) {tensors['token_log_q'][b, g, :n].double().sum().item():.4f}")
        lines.append(f"  response {g}: {_tokens_text(response, tokenizer)}  [{', '.join(fields)}]")
    return lines


def summarize_shard(path: str | Path, tokenizer=None, n_examples: int = 4) -> str:
    """The text summary of the shard at ``path``: header metadata, every tensor's shape and dtype,
    ``n_examples`` prompt/response pairs (decoded with ``tokenizer``, else raw token ids) with
    reward, advantage, length, Σ h and log q, then :func:`rollout_statistics`."""
    tensors, meta = read_shard(path)
    out = [f"shard {path}", "", "metadata:"]
    out += [f"  {key}: {_fmt(meta[key])}" for key in sorted(meta)]
    out += ["", "tensors:"]
    width = max((len(k) for k in tensors), default=0)
    out += [f"  {name:<{width}}  {str(list(t.shape)):<16} {str(t.dtype).replace('torch.', '')}"
            for name, t in sorted(tensors.items())]
    if not all(key in tensors for key in _ROLLOUT_KEYS):
        out += ["", "(not a rollout shard: no responses to show)"]
        return "\n".join(out) + "\n"
    B, G, L = tensors["sequences"].shape
    T = tensors["token_log_q"].shape[-1]
    out += ["", f"examples ({B} prompts x G={G}, prompt width {L - T}, response width {T}):"]
    out += _example_lines(tensors, meta, tokenizer, n_examples)
    out += ["", "statistics (entropies and log q under the sampling measure q):"]
    for key, value in rollout_statistics(tensors, meta).items():
        out.append(f"  {key}: {value:.6g}")
    return "\n".join(out) + "\n"


