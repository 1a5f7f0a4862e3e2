"""Calibration of the SNIS standard error against the effective sample size (not a test).

    python benchmarks/snis_ess_calibration.py POLICY_DIR [--batches 200] [--temperature 0.7]
        [--top-p 0.95] [--prompts 256] [--json OUT.json]

On the embedded policy (POLICY_DIR: a built one, e.g. results/policy of a run), along an update
direction v (``--v``: a run's results/update/v.safetensors; default the exact expected GRPO
gradient E[Y], seq_mean_token_mean, G = 4, over the whole prompt set),
for a log grid of step sizes η: the exact frozen-nucleus ΔH(η) by enumeration (DESIGN §2), then
``--batches`` independent E batches (``--prompts`` prompts drawn uniformly with replacement, G = 4
responses each, each batch with its own seed) and the SNIS estimate ΔĤ(η) ± SE of each. Prints,
per bin of ESS/N, how often the ±2 SE interval covers the exact value (nominal 95.4%), the spread
of the z-scores (ΔĤ − ΔH)/SE and the median bias in SE units. The threshold
:data:`entropy_probe.snis.MIN_ESS_FRACTION` that flags SNIS rows in the report comes from this
table (recorded in benchmarks/README.md, "SNIS calibration").
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from embedded_batches import (G, add_study_arguments, coverage, coverage_line, e_batch, finish,  # noqa: E402
                              load_embedded, study_direction)
from entropy_probe import exact, snis, snis_pass  # noqa: E402

BINS = [1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.0]  # ESS/N bin edges, descending


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("policy_dir")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=256, help="prompt groups per E batch (x G = 4 sequences)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--etas", type=float, nargs="+",
                        default=[10 ** (e / 4) for e in range(-16, 1)])  # 1e-4 .. 1, 4 per decade
    add_study_arguments(parser)
    args = parser.parse_args()
    model, tokenizer, examples = load_embedded(args.policy_dir, args.threads)
    kw = dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=3)
    start = time.time()
    v = study_direction(args.v, model, tokenizer, examples, **kw)
    prompts = [e["prompt"] for e in examples]
    H0 = exact.exact_entropy_at(model, tokenizer, prompts, direction=v, eta=0.0, nucleus="base", **kw)
    truth = {eta: exact.exact_entropy_at(model, tokenizer, prompts, direction=v, eta=eta, nucleus="base", **kw) - H0
             for eta in args.etas}
    print(f"exact ΔH over {len(prompts)} prompts, {len(args.etas)} η: {time.time() - start:.0f} s", flush=True)
    records = []
    for b in range(args.batches):
        seed = 1000 + b
        batch = e_batch(model, tokenizer, examples, args.prompts, seed, temperature=args.temperature,
                        top_p=args.top_p)
        out = snis_pass.snis_pass(model, v, batch, list(args.etas), pad_token_id=tokenizer.pad_token_id,
                             temperature=args.temperature, top_p=args.top_p, tf_batch_size=4096)
        for j, eta in enumerate(args.etas):
            row = snis.delta_h(out["log_w"][j], out["S_shifted"][j], out["S"], out["T"],
                               out["own_nucleus_differs"][j], G, "token")
            records.append({"batch": b, "eta": eta, "delta_h": row["delta_h"], "se": row["se"],
                            "ess_fraction": row["ess"] / row["num_sequences"], "exact": truth[eta]})
        if (b + 1) % 20 == 0:
            print(f"{b + 1} batches, {time.time() - start:.0f} s", flush=True)
    table = summarize(records)
    finish(f"SNIS ±2 SE coverage of the exact frozen-nucleus ΔH (τ = {args.temperature}, top_p = {args.top_p}, "
           f"N = {args.prompts * G}, {args.batches} E batches)", "ESS/N",
           [coverage_line(f"{r['ess_fraction'][0]:.2f}–{r['ess_fraction'][1]:.2f}", r) for r in table], args.json,
           {"settings": vars(args), "truth": truth, "bins": table, "records": records})


def summarize(records: list[dict]) -> list[dict]:
    out = []
    for hi, lo in zip(BINS, BINS[1:]):
        sel = [r for r in records if lo <= r["ess_fraction"] < hi or (hi == 1.0 and r["ess_fraction"] == 1.0)]
        if sel:
            out.append({"ess_fraction": [lo, hi], **coverage(sel)})
    return out


if __name__ == "__main__":
    main()
