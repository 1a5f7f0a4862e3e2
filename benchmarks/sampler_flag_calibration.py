"""Calibration of the sampler column's SE against its event count (not a test).

    python benchmarks/sampler_flag_calibration.py POLICY_DIR [--batches 60] [--prompts 256]
        [--settings 1.0:0.95 1.0:0.8 0.7:0.95 0.7:0.8] [--json OUT.json]

On the embedded policy (POLICY_DIR: a built one, e.g. results/policy of a run), along an update
direction v (``--v``: a run's results/update/v.safetensors; default the exact expected GRPO
gradient, seq_mean_token_mean, G = 4, over the whole prompt set), for each sampler setting τ:top_p
and a log grid of step sizes η: the exact own-nucleus ΔH_sampler(η) by enumeration (θ + ηv's own
nucleus at every prefix), then ``--batches`` independent E batches (``--prompts`` prompts drawn
uniformly with replacement, G = 4 responses each, each batch with its own seed: other prompts,
other noise), each redrawn at θ + ηv by coupled fresh rollouts, with the sampler's ΔĤ ± SE and
its event count: the E sequences along whose visited prefixes θ + ηv's own nucleus differs from
θ's (the SNIS pass's ``own_nucleus_differs``, the events that carry the boundary term). Prints,
per bin of the event count, how often the ±2 SE interval covers the exact value (nominal 95.4%),
the spread of the z-scores and the median z. The threshold
:data:`entropy_probe.fresh.MIN_NUCLEUS_EVENTS` that flags sampler rows in the report comes from
this table (recorded in benchmarks/README.md, "Sampler column calibration").
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
from entropy_probe import exact, fresh, fresh_pass, snis_pass  # noqa: E402

BINS = [0, 1, 3, 6, 11, 21, 51, 10**9]  # event-count bin edges: [lo, hi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("policy_dir")
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=256, help="prompt groups per E batch (x G = 4 sequences)")
    parser.add_argument("--settings", nargs="+", default=["1.0:0.95", "1.0:0.8", "0.7:0.95", "0.7:0.8"],
                        help="sampler settings temperature:top_p")
    parser.add_argument("--etas", type=float, nargs="+",
                        default=[10 ** (e / 2) for e in range(-14, -5)])  # 1e-7 .. 1e-3, 2 per decade
    add_study_arguments(parser)
    args = parser.parse_args()
    model, tokenizer, examples = load_embedded(args.policy_dir, args.threads)
    start = time.time()
    records, truths = [], {}
    for setting in args.settings:
        temperature, top_p = (float(x) for x in setting.split(":"))
        kw = dict(temperature=temperature, top_p=top_p, max_new_tokens=3)
        v = study_direction(args.v, model, tokenizer, examples, **kw)
        prompts = [e["prompt"] for e in examples]
        H0 = exact.exact_entropy_at(model, tokenizer, prompts, direction=v, eta=0.0, nucleus="own", **kw)
        truth = {eta: exact.exact_entropy_at(model, tokenizer, prompts, direction=v, eta=eta, nucleus="own", **kw) - H0
                 for eta in args.etas}
        truths[setting] = truth
        print(f"{setting}: exact own-nucleus ΔH at {len(args.etas)} η: {time.time() - start:.0f} s", flush=True)
        for b in range(args.batches):
            seed = 5000 + b
            batch = e_batch(model, tokenizer, examples, args.prompts, seed, temperature=temperature, top_p=top_p)
            flips = snis_pass.snis_pass(model, v, batch, list(args.etas), pad_token_id=tokenizer.pad_token_id,
                                        temperature=temperature, top_p=top_p, tf_batch_size=4096)["own_nucleus_differs"]
            for j, eta in enumerate(args.etas):
                out, _ = fresh_pass.fresh_rollout_shard(
                    model, tokenizer, batch, v, eta, slots=range(args.prompts), seed=seed, gen_batch_size=4096,
                    tf_batch_size=4096, stop_strings=(), **kw)
                row = fresh.delta_h_sampler(**fresh.per_response(out, "sampler"), G=G, normalization="token")
                records.append({"setting": setting, "batch": b, "eta": eta, "delta_h": row["delta_h"], "se": row["se"],
                                "events": int(flips[j].sum()), "changed": row["changed_responses"],
                                "exact": truth[eta]})
            if (b + 1) % 20 == 0:
                print(f"{setting}: {b + 1} batches, {time.time() - start:.0f} s", flush=True)
    table = summarize(records)
    finish(f"Sampler ΔH ±2 SE coverage of the exact own-nucleus ΔH (settings τ:top_p {' '.join(args.settings)}, "
           f"N = {args.prompts * G}, {args.batches} E batches each)", "events",
           [coverage_line(f"{r['events'][0]}–{r['events'][1] - 1}" if r["events"][1] < BINS[-1] else f"{r['events'][0]}+",
                          r) for r in table], args.json,
           {"settings": vars(args), "truth": truths, "bins": table, "records": records})


def summarize(records: list[dict]) -> list[dict]:
    """Per bin of the event count: :func:`embedded_batches.coverage` of its rows."""
    out = []
    for lo, hi in zip(BINS, BINS[1:]):
        sel = [r for r in records if lo <= r["events"] < hi]
        if sel:
            out.append({"events": [lo, hi], **coverage(sel), "settings": sorted({r["setting"] for r in sel})})
    return out


if __name__ == "__main__":
    main()
