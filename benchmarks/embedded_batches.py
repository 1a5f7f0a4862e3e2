"""What the calibration studies share: the embedded policy with its prompt set, and independent E
batches drawn from it (prompts uniform with replacement, G = 4 responses each, each batch with its
own seed: other prompts, other noise)."""
from __future__ import annotations

import json
import os

import torch

from entropy_probe import models, rewards, rollout

G = 4


def load_embedded(policy_dir: str, threads: int):
    """(model, tokenizer, examples) of a built embedded policy (results/policy of a run)."""
    torch.set_num_threads(threads)
    model = models.load_policy(policy_dir, "float32", "cpu")
    tokenizer = models.load_tokenizer(policy_dir)
    examples = [json.loads(line) for line in open(os.path.join(policy_dir, "prompts.jsonl"))]
    return model, tokenizer, examples


def e_batch(model, tokenizer, examples: list[dict], num_prompts: int, seed: int, *, temperature: float,
            top_p: float, max_new_tokens: int = 3) -> dict:
    """One E batch of ``num_prompts`` prompt groups (slots 0..n-1, noise seed ``seed``)."""
    ids = torch.randint(0, len(examples), (num_prompts,), generator=torch.Generator().manual_seed(seed)).tolist()
    return rollout.rollout_shard(model, tokenizer, examples, ids, G=G, kind="E", shard_index=0, slots=range(len(ids)),
                                 seed=seed, max_new_tokens=max_new_tokens, rollout_batch_size=4096,
                                 gen_batch_size=4096, reward_fn=rewards.exact_match, temperature=temperature,
                                 top_p=top_p)


def coverage(rows: list[dict]) -> dict:
    """How estimates ``rows`` ({"delta_h", "se", "exact", "eta"}) cover their exact values: the count,
    the ±2 SE coverage, sd and median of z = (ΔĤ − ΔH)/SE and the η they span (a row with SE 0
    counts as covered only when its estimate is exact)."""
    z = torch.tensor([(r["delta_h"] - r["exact"]) / r["se"] if r["se"] > 0
                      else (0.0 if r["delta_h"] == r["exact"] else float("inf")) for r in rows], dtype=torch.float64)
    finite = z[z.isfinite()]
    return {"count": len(rows), "coverage_2se": float((z.abs() <= 2).double().mean()),
            "z_sd": float(finite.std()) if finite.numel() > 1 else None, "z_median": float(z.median()),
            "etas": sorted({r["eta"] for r in rows})}


def coverage_line(label: str, row: dict) -> str:
    sd = "-" if row["z_sd"] is None else f"{row['z_sd']:.2f}"
    return (f"{label:>13} {row['count']:>6} {row['coverage_2se']:>9.3f} {sd:>7} {row['z_median']:>9.2f}  "
            f"{min(row['etas']):.2g}..{max(row['etas']):.2g}")


def finish(title: str, label: str, lines: list[str], json_path: str | None, payload: dict) -> None:
    """Print the coverage table and write the study's JSON (``--json``)."""
    print("\n".join([title, f"{label:>13} {'count':>6} {'coverage':>9} {'sd(z)':>7} {'median z':>9}  η range", *lines]))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=1)


def add_study_arguments(parser) -> None:
    """The options every calibration study takes: the direction, threads, the JSON output."""
    parser.add_argument("--v", help="an update vector v.safetensors (results/update/v.safetensors of a run); "
                        "default: the exact expected GRPO gradient")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")


def study_direction(v_path: str | None, model, tokenizer, examples: list[dict], **sampling) -> dict:
    """``--v``'s update vector, or the exact expected GRPO gradient (seq_mean_token_mean, G = 4)
    over the whole prompt set under ``sampling`` (temperature, top_p, max_new_tokens)."""
    from entropy_probe import exact_terms, shards

    if v_path:
        return shards.read_shard(v_path, {"kind": "v"})[0]
    return exact_terms.exact_grpo_gradient(model, tokenizer, [e["prompt"] for e in examples],
                                           [e["answer"] for e in examples], G=G, **sampling)
