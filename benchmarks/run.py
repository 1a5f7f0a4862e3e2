"""Performance benchmarks of the teacher-forcing passes and of generation (not tests).

    python benchmarks/run.py [--quick] [--threads K] [--gpu] [--json OUT.json] [--only NAME ...]

Every comparison runs in the same process (memory: in fresh subprocesses) on the same inputs:

  x_vs_loop     the X pass (passes.x_gradient) against a per-sequence loop — one forward/backward
                per (prompt, response) pair through the model's own forward, the same surrogate —
                on the embedded tiny policy and on a mid-size random Qwen2 (vocab 32k, T = 128);
                tokens/s and the relative difference of the two gradients
  flops         achieved FLOP/s of the X and Y passes (6·params·tokens + causal attention, real
                tokens only) against a measured square-matmul peak, same machine, threads, dtype;
                each ratio pairs one peak measurement with the pass timed right after it (median
                of 3 pairs: a shared machine's drifting speed cancels within a pair)
  memory        peak memory of the X pass at vocabulary 151,936 against the model's own forward +
                backward with a plain cross-entropy loss (CPU: resident-set high-water mark in a
                fresh process per measurement; CUDA: torch.cuda.max_memory_allocated)
  generation    sequences/s of generate.sample (one batched call) against plain model.generate
                called once per prompt (num_return_sequences = G)
  decoding      tokens/s of batched decoding against the roofline of the step
  sampler       the sampler's share of a decoding step at vocabulary 151,936 (benchmarks/sampling.py)
  fresh         fresh rollouts by verification against full regeneration, per η (benchmarks/sampling.py)

Defaults fit a few minutes on 2 CPU cores (``--quick``: about a minute). ``--gpu`` uses CUDA and
GPU sizes (the Qwen2.5-0.5B shape, random weights; bf16 autocast rows beside fp32 with TF32 off).
Targets (printed beside the figures): X pass ≥ 60% of the matmul peak (CPU, mid-size model);
≥ 10× the loop's tokens/s on the tiny policy and ≥ 1× on the mid-size model; X-pass peak memory
≤ 1.5× the plain forward+backward at vocabulary 151,936; the sampler ≤ 0.3 of a decoding step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # the passes' progress bars (read when tqdm is imported)

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # workloads; the package, also when not pip-installed
import sampling  # noqa: E402
import workloads as W  # noqa: E402

from entropy_probe import generate, models, noise, parameters, passes, teacher_force, tf_layout  # noqa: E402

BENCHMARKS = ["x_vs_loop", "flops", "memory", "generation", "decoding", "sampler", "fresh"]
ROWS: list[dict] = []
PEAKS: dict[str, list[float]] = {}  # matmul peaks measured during the run, per dtype
SMOKE = {"on": False}


def row(benchmark: str, setting: str, ours: str, reference: str, ratio: float | None, target: str = "",
        met: bool | None = None, **extra):
    if SMOKE["on"]:  # a smoke run checks the code, not the targets
        target, met = "", None
    entry = {"benchmark": benchmark, "setting": setting, "ours": ours, "reference": reference,
             "ratio": ratio, "target": target, "met": met} | extra
    ROWS.append(entry)
    verdict = "" if met is None else ("yes" if met else "NO")
    print(f"  {benchmark:<12} {setting:<44} {ours:>22} {reference:>22} "
          f"{'' if ratio is None else f'{ratio:8.3f}'} {target:>10} {verdict}", flush=True)


def x_kwargs(pad, top_p=1.0, temperature=1.0):
    return dict(pad_token_id=pad, temperature=temperature, top_p=top_p, H_bar=1.0, normalization="token",
                baseline="loo", pathwise_term=True)


# ---------------------------------------------------------------------------------------------


def bench_x_vs_loop_tiny(args):
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = W.build_tiny(tmp)
    model.to(args.device)
    B = args.preset.tiny_prompts
    rollout = W.tiny_rollout(model, tokenizer, B=B, G=4, seed=0, top_p=0.95)
    params = parameters.select(model)
    tokens, _, _ = W.token_counts(rollout)
    kw = x_kwargs(tokenizer.pad_token_id, top_p=0.95)
    ours_s, (ours, _) = W.timed(lambda: passes.x_gradient(model, params, rollout, tf_batch_size=64, **kw),
                                args.device, repeats=3, warmup=1)
    loop_s, loop = W.timed(lambda: W.per_sequence_x_gradient(model, params, rollout, temperature=1.0, top_p=0.95,
                                                             H_bar=1.0), args.device, repeats=1)
    ratio = loop_s / ours_s
    row("x_vs_loop", f"tiny policy, {B * 4} seqs, top_p .95, tf_batch 64", f"{tokens / ours_s:,.0f} tok/s",
        f"{tokens / loop_s:,.0f} tok/s", ratio, "≥ 10×", ratio >= 10,
        grad_rel_diff=W.max_relative_difference(ours, loop), ours_s=ours_s, loop_s=loop_s, tokens=tokens)
    print(f"      gradient ‖ours − loop‖/‖loop‖ = {ROWS[-1]['grad_rel_diff']:.2e}")


def mid_setup(args):
    spec = W.SIZES[args.preset.model]
    model = W.build_qwen2(spec, args.device)
    B, G, P, T = args.preset.x_batch
    rollout = W.synthetic_rollout(model, B=B, G=G, P=P, T=T, seed=0)
    params = parameters.select(model)
    n_params = sum(p.numel() for p in model.parameters())
    return spec, model, rollout, params, f"{spec.name} {n_params / 1e6:.0f}M, {B * G} seqs, P≤{P}, T≤{T}"


def bench_x_vs_loop_mid(args, setup):
    spec, model, rollout, params, label = setup
    tokens, _, _ = W.token_counts(rollout)
    n = rollout["sequences"].shape[0] * rollout["sequences"].shape[1]
    kw = x_kwargs(spec.vocab - 2)
    ours_s, (ours, _) = W.timed(lambda: passes.x_gradient(model, params, rollout, tf_batch_size=n, **kw),
                                args.device, repeats=2, warmup=1)
    loop_s, loop = W.timed(lambda: W.per_sequence_x_gradient(model, params, rollout, temperature=1.0, top_p=1.0,
                                                             H_bar=1.0), args.device, repeats=1,
                           warmup=1 if args.device == "cuda" else 0)
    ratio = loop_s / ours_s
    row("x_vs_loop", label, f"{tokens / ours_s:,.0f} tok/s", f"{tokens / loop_s:,.0f} tok/s", ratio, "≥ 1×",
        ratio >= 1, grad_rel_diff=W.max_relative_difference(ours, loop), ours_s=ours_s, loop_s=loop_s,
        tokens=tokens)
    print(f"      gradient ‖ours − loop‖/‖loop‖ = {ROWS[-1]['grad_rel_diff']:.2e}")


def paired_fraction_of_peak(fn, flops, device, dtype, name, rounds=3):
    """(median fraction of peak, median seconds, median peak): ``rounds`` pairs of one matmul-peak
    measurement right before one timed call, after a warm-up call. Each ratio compares two
    measurements taken seconds apart, so a shared machine's drifting speed cancels in the pair
    instead of biasing a best-of-run peak against a slower pass."""
    fn()
    W.synchronize(device)
    pairs = []
    for _ in range(rounds):
        peak = W.matmul_peak(device, dtype)
        seconds, _ = W.timed(fn, device, repeats=1)
        pairs.append((flops / seconds / peak, seconds, peak))
    PEAKS.setdefault(name, []).extend(p for _, _, p in pairs)
    ratios, seconds, peaks = (sorted(x) for x in zip(*pairs))
    mid = len(pairs) // 2
    return ratios[mid], seconds[mid], peaks[mid]


def bench_flops(args, setup):
    spec, model, rollout, params, label = setup
    n = rollout["sequences"].shape[0] * rollout["sequences"].shape[1]
    flops = W.train_flops(model, rollout)
    gpu = args.device == "cuda"
    rounds = 2 if args.size == "smoke" else 3
    dtypes = [("fp32", torch.float32, None)] + ([("bf16 autocast", torch.bfloat16, "bfloat16")] if gpu else [])
    for name, dtype, autocast in dtypes:
        runs = {
            "X": lambda: passes.x_gradient(model, params, rollout, tf_batch_size=n, autocast_dtype=autocast,
                                           **x_kwargs(spec.vocab - 2)),
            "Y": lambda: passes.y_gradient(model, params, rollout, W.grpo_numerators(rollout),
                                           pad_token_id=spec.vocab - 2, temperature=1.0, tf_batch_size=n,
                                           autocast_dtype=autocast),
        }
        for pass_name, fn in runs.items():
            ratio, seconds, peak = paired_fraction_of_peak(fn, flops, args.device, dtype, name, rounds)
            target = "≥ 0.60" if (pass_name == "X" and not gpu and name == "fp32") else ""
            row("flops", f"{pass_name} pass {name}, {label}", f"{flops / seconds / 1e9:,.1f} GFLOP/s",
                f"{peak / 1e9:,.1f} GFLOP/s", ratio, target, (ratio >= 0.6) if target else None,
                seconds=seconds, flops=flops)
    if args.size == "default" and not gpu:  # the nucleus at top_p < 1 (topk, no full sort)
        nucleus_rollout = W.synthetic_rollout(model, B=2, G=4, P=64, T=128, seed=1, top_p=0.95)
        flops_p = W.train_flops(model, nucleus_rollout)
        ratio, seconds, peak = paired_fraction_of_peak(
            lambda: passes.x_gradient(model, params, nucleus_rollout, tf_batch_size=8,
                                      **x_kwargs(spec.vocab - 2, top_p=0.95)),
            flops_p, args.device, torch.float32, "fp32", rounds=1)
        sizes = nucleus_sizes(model, nucleus_rollout, spec.vocab - 2, 0.95)
        row("flops", f"X pass fp32 top_p .95 (nucleus median {sizes[0]}, p90 {sizes[1]})",
            f"{flops_p / seconds / 1e9:,.1f} GFLOP/s", f"{peak / 1e9:,.1f} GFLOP/s", ratio,
            seconds=seconds, flops=flops_p)


def nucleus_sizes(model, rollout, pad, top_p):
    from entropy_probe import measure

    batch = tf_layout.from_rollout(rollout, pad)
    scorer = teacher_force.ResponseLogits(model)
    device = next(model.parameters()).device
    rows, cols, _ = tf_layout.valid_pairs(batch, device)
    with torch.no_grad():
        hidden, head = teacher_force.response_hidden_and_head(scorer, batch, rows, cols)
        sizes = torch.cat([measure.nucleus_mask(head(h), 1.0, top_p).sum(-1) for h in hidden.split(256)]).float()
    return int(sizes.median()), int(sizes.quantile(0.9))


def bench_memory(args):
    spec = args.preset.memory_model
    seqs, P, T = args.preset.memory_batch
    results = {}
    for mode in ("plain", "x"):
        cmd = [sys.executable, os.path.join(HERE, "memory_child.py"), mode, spec, "--seqs", str(seqs),
               "--prompt", str(P), "--response", str(T), "--device", args.device]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[mode] = json.loads(out)
    ratio = results["x"]["peak_increase_bytes"] / results["plain"]["peak_increase_bytes"]
    row("memory", f"{spec} V=151,936, {seqs} seqs, P≤{P}, T≤{T}, chunk {results['x']['chunk_tokens']}",
        f"{results['x']['peak_increase_bytes'] / 2**20:,.0f} MiB", f"{results['plain']['peak_increase_bytes'] / 2**20:,.0f} MiB",
        ratio, "≤ 1.5×", ratio <= 1.5, details=results)


def bench_generation(args, setup):
    spec, model, _, _, label = setup
    B, G, P, T = args.preset.generation
    V = spec.vocab
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V - 2, (B, P), generator=g)
    mask = torch.ones_like(prompts)
    eos, pad = -1, V - 2  # no EOS: every response runs to max_new_tokens in both (same work)

    def ours():
        return generate.sample(model, prompts, mask, G, temperature=1.0, top_p=0.95, max_new_tokens=T,
                               eos_token_id=eos, pad_token_id=pad,
                               noise_key=noise.NoiseKey(0, noise.STREAM_E), slots=range(B))

    def plain():
        from transformers import GenerationConfig

        config = GenerationConfig(do_sample=True, top_p=0.95, temperature=1.0, top_k=0, max_new_tokens=T,
                                  num_return_sequences=G, eos_token_id=None, pad_token_id=pad, bos_token_id=None)
        with torch.no_grad():
            for b in range(B):
                model.generate(input_ids=prompts[b:b + 1].to(args.device), attention_mask=mask[b:b + 1].to(args.device),
                               generation_config=config)

    repeats = 2 if args.size in ("quick", "smoke") else 1
    ours_s, _ = W.timed(ours, args.device, repeats=repeats, warmup=1)
    plain_s, _ = W.timed(plain, args.device, repeats=repeats, warmup=1)
    row("generation", f"{spec.name}, {B} prompts × G={G}, {T} new tokens, top_p .95", f"{B * G / ours_s:,.1f} seq/s",
        f"{B * G / plain_s:,.1f} seq/s", plain_s / ours_s, ours_s=ours_s, plain_s=plain_s)


def bench_decoding(args, setup):
    """Tokens/s of batched decoding (generate.sample, no EOS: every row runs to the last token)
    against the roofline of the step: weights + KV cache read at the measured copy bandwidth,
    2·params FLOPs per row at the measured matmul peak of the dtype (workloads.decoding_bounds)."""
    spec, model, _, _, _ = setup
    V = spec.vocab
    bandwidth = W.memory_bandwidth(args.device)
    print(f"      memory bandwidth (copy): {bandwidth / 1e9:,.1f} GB/s")
    for name, dtype, autocast in (("fp32", torch.float32, None), ("bf16", torch.bfloat16, "bfloat16")):
        peak = W.matmul_peak(args.device, dtype)
        for B, G, P, T in args.preset.decoding:
            g = torch.Generator().manual_seed(1)
            prompts = torch.randint(0, V - 2, (B, P), generator=g)
            mask = torch.ones_like(prompts)

            def call():
                return generate.sample(model, prompts, mask, G, temperature=1.0, top_p=0.95, max_new_tokens=T,
                                       eos_token_id=-1, pad_token_id=V - 2, noise_key=noise.NoiseKey(0, noise.STREAM_E),
                                       slots=range(B), autocast_dtype=autocast)

            seconds, _ = W.timed(call, args.device, repeats=1, warmup=1)
            rows = B * G
            bounds = W.decoding_bounds(model, rows, P, T, 2 if autocast else 4, bandwidth, peak)
            ours = rows * T / seconds
            limit = "bandwidth" if bounds["tokens_per_s_bandwidth"] <= bounds["tokens_per_s_compute"] else "compute"
            row("decoding", f"{spec.name} {name}, {rows} rows, P={P}, {T} new tokens (bound: {limit})",
                f"{ours:,.0f} tok/s", f"{bounds['tokens_per_s_roofline']:,.0f} tok/s",
                ours / bounds["tokens_per_s_roofline"], seconds=seconds, bandwidth=bandwidth, peak_flops=peak, **bounds)
            print(f"      bounds: bandwidth {bounds['tokens_per_s_bandwidth']:,.0f} tok/s "
                  f"({bounds['step_bytes'] / 2**20:,.0f} MiB per step), compute {bounds['tokens_per_s_compute']:,.0f} tok/s")


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    info["cpu_count"] = os.cpu_count()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="= --size quick (a couple of minutes on 2 CPU cores)")
    parser.add_argument("--gpu", action="store_true", help="= --device cuda --size large")
    parser.add_argument("--size", choices=sorted(W.PRESETS), default=None,
                        help="default (CPU, mid-size), quick, large (GPU: the Qwen2.5-0.5B shape), smoke")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or process CPU time (per thread-second: for a shared, loaded machine)")
    parser.add_argument("--only", nargs="*", default=None,
                        choices=BENCHMARKS, help="run only these")
    parser.add_argument("--e2e", action="store_true",
                        help="the whole workflow instead (benchmarks/e2e.py): CPU at a small size, with --gpu the "
                             "Qwen2.5-1.5B shape with LoRA; a per-stage table from the rules' benchmark files")
    parser.add_argument("--cores", type=int, default=None, help="--e2e: snakemake --cores (default: all)")
    parser.add_argument("--keep", default=None, help="--e2e: run in this directory and keep it")
    parser.add_argument("--json", default=None, help="write the rows and the machine description here")
    args = parser.parse_args()
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    args.size = args.size or ("large" if args.gpu else "quick" if args.quick else "default")
    args.preset = W.PRESETS[args.size]
    SMOKE["on"] = args.size == "smoke"
    if SMOKE["on"]:
        W.PEAK_SIZE["n"] = 256
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu is for CPU runs")
    W.CLOCK["name"] = args.clock
    if args.threads:
        torch.set_num_threads(args.threads)
    models.set_precision()  # fp32 at full precision: TF32 off (DESIGN §2 "Precision")
    info = machine() | {"clock": args.clock}
    print("machine:", json.dumps(info))
    if args.e2e:
        import e2e

        report = e2e.run("gpu" if args.device == "cuda" else "cpu", args.cores or os.cpu_count(), args.keep)
        e2e.print_table(report)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": info, "args": vars(args), "e2e": report}, f, indent=1, default=str)
        return
    print(f"  {'benchmark':<12} {'setting':<44} {'ours':>22} {'reference':>22} {'ratio':>8} {'target':>10} met")
    wanted = set(args.only or BENCHMARKS)
    start = time.perf_counter()
    if "x_vs_loop" in wanted:
        bench_x_vs_loop_tiny(args)
    setup = mid_setup(args) if wanted & {"x_vs_loop", "flops", "generation", "decoding", "fresh"} else None
    if "x_vs_loop" in wanted:
        bench_x_vs_loop_mid(args, setup)
    if "flops" in wanted:
        bench_flops(args, setup)
    if "memory" in wanted:
        bench_memory(args)
    if "generation" in wanted:
        bench_generation(args, setup)
    if "decoding" in wanted:
        bench_decoding(args, setup)
    if "sampler" in wanted:
        sampling.bench_sampler(args, row)
    if "fresh" in wanted:
        sampling.bench_fresh(args, setup, row)
    if PEAKS:
        info["matmul_peaks_flops"] = PEAKS
        print("matmul peaks measured (GFLOP/s): " + "; ".join(
            f"{k}: " + ", ".join(f"{p / 1e9:,.1f}" for p in v) for k, v in PEAKS.items()))
    info["total_seconds"] = time.perf_counter() - start
    print(f"total {info['total_seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "rows": ROWS}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
