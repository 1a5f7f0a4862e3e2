"""bf16 against fp32 (a measurement, not a test): how far ``model.precision: bfloat16`` moves δH₁
and ΔH, in units of the fp32 standard errors, and how far the X·v reverse/forward cross-check
moves (the bound of entropy_probe/precision.py comes from these numbers).

    python benchmarks/precision.py embedded [--seeds 0 1 2] [--config config/config.yaml] [--json OUT]
    python benchmarks/precision.py mid [--seeds 0] [--json OUT]

``embedded``: the whole workflow on the embedded policy (Snakemake, in a scratch directory), once in
fp32 and once in bf16 per seed (``batch_config.seed``; the bf16 run reuses the fp32 run's policy,
data and plans). The rollouts of the two runs are coupled (the same Gumbel noise per slot), so most
responses are the same and the difference is bf16's, not a fresh draw's.

``mid``: the mid-size random Qwen2 of benchmarks/workloads.py (86 M parameters, vocabulary 32,000),
the same stages by library calls: coupled rollouts (random token prompts, random rewards keyed by
slot), X and Y passes, v = Y (SGD), the directional pass, SNIS, at each precision. Two
comparisons: end to end (bf16 rollouts too: with long responses the coupled draws part ways after
the first differing token, so this includes a fresh draw's noise) and passes only (the fp32
rollouts, teacher-forced in bf16: the precision's own effect on the estimators).

Every row: per η, |bf16 − fp32| / SE_fp32 for δH₁ and for ΔH, and the cross-check's relative
difference |X·v_reverse − X·v_forward| / |X·v| and in units of the SE of X·v.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO]


def compare(fp32: dict, bf16: dict) -> dict:
    """Rows per η of |bf16 − fp32| in units of the fp32 SE, from two summary-like dicts
    ({"rows": [{"eta", "delta_h1", "delta_h1_se", "delta_h", "delta_h_se"}], "first_order": {...}})."""
    rows = []
    by_eta = {r["eta"]: r for r in bf16["rows"]}
    for a in fp32["rows"]:
        b = by_eta[a["eta"]]
        rows.append({"eta": a["eta"],
                     "delta_h1_fp32": a["delta_h1"], "delta_h1_bf16": b["delta_h1"], "delta_h1_se_fp32": a["delta_h1_se"],
                     "delta_h1_shift_in_se": abs(b["delta_h1"] - a["delta_h1"]) / a["delta_h1_se"],
                     "delta_h_fp32": a.get("delta_h"), "delta_h_bf16": b.get("delta_h"), "delta_h_se_fp32": a.get("delta_h_se"),
                     "delta_h_shift_in_se": (abs(b["delta_h"] - a["delta_h"]) / a["delta_h_se"]) if "delta_h" in a else None,
                     "exact_delta_h": a.get("exact_delta_h")})
    checks = {}
    for name, run in (("fp32", fp32), ("bf16", bf16)):
        fo = run["first_order"]
        diff = abs(fo["X_dot_v"] - fo["X_dot_v_directional"])
        checks[name] = {"relative": diff / abs(fo["X_dot_v"]), "in_se": diff / fo["X_dot_v_se"],
                        "X_dot_v": fo["X_dot_v"], "X_dot_v_directional": fo["X_dot_v_directional"],
                        "X_dot_v_se": fo["X_dot_v_se"]}
    return {"rows": rows, "crosscheck": checks}


def print_comparison(label: str, result: dict) -> None:
    print(f"\n{label}")
    print(f"  {'eta':>8} {'δH₁ fp32':>11} {'δH₁ bf16':>11} {'SE':>9} {'shift/SE':>8}   "
          f"{'ΔH fp32':>11} {'ΔH bf16':>11} {'SE':>9} {'shift/SE':>8}")
    for r in result["rows"]:
        dh = (f"{r['delta_h_fp32']:>11.4g} {r['delta_h_bf16']:>11.4g} {r['delta_h_se_fp32']:>9.2g} "
              f"{r['delta_h_shift_in_se']:>8.3f}") if r["delta_h_fp32"] is not None else ""
        print(f"  {r['eta']:>8.2g} {r['delta_h1_fp32']:>11.4g} {r['delta_h1_bf16']:>11.4g} {r['delta_h1_se_fp32']:>9.2g} "
              f"{r['delta_h1_shift_in_se']:>8.3f}   {dh}")
    for name, c in result["crosscheck"].items():
        print(f"  X·v cross-check {name}: reverse {c['X_dot_v']:.6g}, forward {c['X_dot_v_directional']:.6g}: "
              f"relative {c['relative']:.2e}, {c['in_se']:.3f} SE")


# --------------------------------------------------------------------------------- embedded


def run_workflow(work: str, config: dict) -> dict:
    import yaml

    with open(os.path.join(work, "probe.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    cmd = [sys.executable, "-m", "snakemake", "-s", os.path.join(REPO, "Snakefile"), "--directory", work,
           "--configfile", os.path.join(work, "probe.yaml"), "--cores", "2", "-q"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    with open(os.path.join(work, "results", "summary.json")) as f:
        return json.load(f)


def embedded(args) -> list[dict]:
    import yaml

    base = yaml.safe_load(open(args.config))
    out = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="precision_") as tmp:
            config = json.loads(json.dumps(base))
            config["batch_config"]["seed"] = seed
            fp32_dir, bf16_dir = os.path.join(tmp, "fp32"), os.path.join(tmp, "bf16")
            os.makedirs(fp32_dir)
            start = time.perf_counter()
            fp32 = run_workflow(fp32_dir, config | {"model": config["model"] | {"precision": "float32"}})
            shutil.copytree(fp32_dir, bf16_dir, symlinks=True)
            bf16 = run_workflow(bf16_dir, config | {"model": config["model"] | {"precision": "bfloat16"}})
            result = compare(fp32, bf16) | {"seed": seed, "seconds": time.perf_counter() - start}
        print_comparison(f"embedded policy, {args.config}, seed {seed}", result)
        out.append(result)
    return out


# -------------------------------------------------------------------------------------- mid


def mid_rollouts(model, prompts, precision: str, *, G: int, T: int, top_p: float, seed: int, n_u: int):
    """(E, U) rollout shards sampled at ``precision`` (random rewards keyed by slot on U)."""
    import torch

    import workloads as W

    ids, mask = prompts
    kw = dict(temperature=1.0, top_p=top_p, autocast_dtype=precision)
    u = W.sampled_shard(model, ids[:n_u], mask[:n_u], G, T, seed=seed, stream="U", **kw)
    e = W.sampled_shard(model, ids[n_u:], mask[n_u:], G, T, seed=seed, stream="E", **kw)
    u["rewards"] = (torch.rand(n_u, G, generator=torch.Generator().manual_seed(seed + 1)) < 0.5).float()
    return e, u


def mid_probe(model, rollouts, precision: str, etas: list[float], *, G: int, top_p: float) -> dict:
    """The probe's stages on ``model`` by library calls at ``precision`` on (E, U) ``rollouts``:
    a summary-like dict."""
    from entropy_probe import estimators, gradients, losses, normalization, parameters, passes, snis, snis_pass

    e, u = rollouts
    pad = model.config.vocab_size - 2
    params = parameters.select(model)
    plug = normalization.batch_plugins(e["rb_entropies"].double().sum(-1).reshape(-1), e["response_lens"].reshape(-1))
    common = dict(pad_token_id=pad, temperature=1.0, tf_batch_size=16, autocast_dtype=precision)
    x_kw = dict(top_p=top_p, normalization="token", baseline="loo", pathwise_term=True)
    X, stats = passes.x_gradient(model, params, e, H_bar=plug["H_bar_token"], **x_kw, **common)
    X = {k: g / normalization.get("token").x_denominator(stats["T"]) for k, g in X.items()}
    a, z = losses.response_weights("grpo", losses.group_advantages(u["rewards"], "none"), u["response_lens"])
    Y = passes.y_gradient(model, params, u, a, **common)
    v = {k: g / float(z.sum()) for k, g in Y.items()}  # SGD: v = Y
    sums = passes.directional_sums(model, v, e, **x_kw, **common)
    xv = gradients.dot(X, v)
    xv_forward, se = estimators.directional_estimate(sums["P"], sums["Q"], sums["S"], sums["T"], G, "token")
    sweep = sorted({*etas, *(-x for x in etas)})
    out = snis_pass.snis_pass(model, v, e, sweep, pad_token_id=pad, temperature=1.0, top_p=top_p, tf_batch_size=16,
                         autocast_dtype=precision)
    measured = {eta: snis.delta_h(out["log_w"][j], out["S_shifted"][j], out["S"], out["T"],
                                  out["own_nucleus_differs"][j], G, "token") for j, eta in enumerate(sweep)}
    rows = [{"eta": eta, "delta_h1": eta * xv, "delta_h1_se": eta * se, "delta_h": measured[eta]["delta_h"],
             "delta_h_se": measured[eta]["se"]} for eta in etas]
    return {"rows": rows, "first_order": {"X_dot_v": xv, "X_dot_v_directional": xv_forward, "X_dot_v_se": se}}


def mid(args) -> list[dict]:
    import torch

    import workloads as W
    from entropy_probe import models

    models.set_precision()
    torch.set_num_threads(args.threads)
    spec = W.SIZES[args.model]
    model = W.build_qwen2(spec)
    out = []
    for seed in args.seeds:
        g = torch.Generator().manual_seed(seed)
        n = args.prompts + args.u_prompts
        lens = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (n,), generator=g)
        ids = torch.randint(0, spec.vocab - 2, (n, args.prompt_len), generator=g)
        mask = (torch.arange(args.prompt_len)[None, :] >= (args.prompt_len - lens)[:, None]).long()
        ids = torch.where(mask.bool(), ids, spec.vocab - 2)
        start = time.perf_counter()
        sample = dict(G=args.G, T=args.new_tokens, top_p=args.top_p, seed=seed, n_u=args.u_prompts)
        rollouts = {p: mid_rollouts(model, (ids, mask), p, **sample) for p in ("float32", "bfloat16")}
        probe = dict(G=args.G, top_p=args.top_p)
        fp32 = mid_probe(model, rollouts["float32"], "float32", args.etas, **probe)
        passes_only = mid_probe(model, rollouts["float32"], "bfloat16", args.etas, **probe)
        end_to_end = mid_probe(model, rollouts["bfloat16"], "bfloat16", args.etas, **probe)
        same = float((rollouts["float32"][0]["sequences"] == rollouts["bfloat16"][0]["sequences"]).all(-1)
                     .float().mean())
        setting = (f"{spec.name}, {args.prompts} E prompts × G={args.G}, {args.u_prompts} U prompts, "
                   f"{args.new_tokens} new tokens, top_p {args.top_p}")
        result = {"seed": seed, "seconds": time.perf_counter() - start, "identical_responses_share": same,
                  "setting": setting, "passes_only": compare(fp32, passes_only),
                  "end_to_end": compare(fp32, end_to_end)}
        print_comparison(f"{setting}, seed {seed}: passes only (fp32 rollouts teacher-forced in bf16)",
                         result["passes_only"])
        print_comparison(f"{setting}, seed {seed}: end to end (bf16 rollouts; identical E responses {same:.1%})",
                         result["end_to_end"])
        out.append(result)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["embedded", "mid"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--config", default=os.path.join(REPO, "config", "config.yaml"), help="embedded: the config")
    parser.add_argument("--model", default="mid", help="mid: the workloads.SIZES entry")
    parser.add_argument("--prompts", type=int, default=16, help="mid: E prompts")
    parser.add_argument("--u-prompts", type=int, default=8, help="mid: U prompts")
    parser.add_argument("--G", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--etas", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 3e-2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = embedded(args) if args.which == "embedded" else mid(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
