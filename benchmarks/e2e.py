"""The whole workflow at a stated size, timed stage by stage (``python benchmarks/run.py --e2e``).

A synthetic policy is written to a scratch directory: a random checkpoint of the stated shape (a
Llama with q/k/v/o biases, :func:`build_model`) with a WordLevel tokenizer of its vocabulary, a
random LoRA adapter on every linear layer of the decoder, a jsonl prompt set of random words and a
custom reward (the parity of the response's characters, so every U group has signal): the cost of
every stage depends on the shapes, not on the weights. The output embedding is untied (Qwen2.5-1.5B ties it: the same FLOPs; tied random
weights would make the policy copy its last token, since a random decoder's hidden state is
mostly the input embedding), and its EOS row is zero, so EOS has logit 0 while the nucleus
(top_p 0.95 of logits with std 4) holds only the largest logits: responses run to
``max_new_tokens`` (the run reports every stop reason). Then Snakemake runs the default target and
the per-stage table is read from the rules' ``benchmark:`` files (``results/benchmarks/*.tsv``:
wall seconds, CPU seconds, peak resident memory) and, on CUDA, the peak device memory each stage
logs.

Sizes (:data:`E2E_PRESETS`): ``cpu`` a small Qwen2 (minutes on 2 cores); ``gpu`` the
Qwen2.5-1.5B shape with LoRA r = 16, E = 4096 responses of 512 tokens, B_U = 64 × G = 8, five η
with central differences, bf16.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

import workloads as W  # noqa: E402

from entropy_probe import job_cost  # noqa: E402


@dataclass
class E2EPreset:
    model: W.ModelSpec
    lora_rank: int
    prompts: int  # rows of the prompt file
    prompt_words: int  # longest prompt (words = tokens); the shortest is half
    overrides: dict = field(default_factory=dict)  # config sections


E2E_PRESETS = {
    "cpu": E2EPreset(
        W.ModelSpec("qwen2-e2e-cpu", 8_000, 256, 4, 4, 2, 704), lora_rank=8, prompts=200,
        prompt_words=32,
        overrides={
            "batch_config": {"E_total_sequences": 128, "G": 4, "B_U": 8, "E_num_shards": 2, "U_num_shards": 2},
            "generation": {"max_new_tokens": 32, "top_p": 0.95, "gen_batch_size": 64},
            "teacher_forcing": {"batch_size": 32},
            "model": {"precision": "float32", "device": "cpu"},
        }),
    "gpu": E2EPreset(
        W.ModelSpec("qwen2.5-1.5b-shape", 151_936, 1_536, 28, 12, 2, 8_960), lora_rank=16,
        prompts=2_000, prompt_words=128,
        overrides={
            "batch_config": {"E_total_sequences": 4096, "G": 8, "B_U": 64, "E_num_shards": 2, "U_num_shards": 2},
            "generation": {"max_new_tokens": 512, "top_p": 0.95, "gen_batch_size": 4096, "rollout_batch_size": 512},
            "teacher_forcing": {"batch_size": 64, "chunk_tokens": 4096},
            "model": {"precision": "bfloat16", "device": "cuda"},
        }),
}
ETAS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]  # five η, central differences: 11 SNIS parameter points
# A reward that varies within prompt groups (random words never match a gold answer, and a U batch
# without signal stops an SGD run): the parity of the response's characters.
REWARD = """def reward(response: str, gold: str) -> float:
    return float(sum(map(ord, response)) % 2)
"""


def build_tokenizer(vocab: int):
    """A whitespace WordLevel tokenizer of ``vocab`` tokens: w0 … w{V−3}, <pad>, <eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 2)} | {"<pad>": vocab - 2, "<eos>": vocab - 1}
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", padding_side="left")


def build_model(spec: W.ModelSpec, device: str, seed: int):
    """A random decoder of ``spec``'s shape, as a Llama with q/k/v/o biases (Qwen2's layout but
    for the o bias: transformers loads a Qwen2 checkpoint's tokenizer as Qwen2's byte-level BPE,
    which would ignore the WordLevel vocabulary of :func:`build_tokenizer`). The output embedding
    is scaled so the logits have std ``spec.logit_std`` (a peaked policy), as in workloads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, intermediate_size=spec.intermediate,
        max_position_embeddings=4096, tie_word_embeddings=spec.tied, attention_bias=True, bos_token_id=None,
        pad_token_id=None, eos_token_id=spec.vocab - 1, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(spec.logit_std / (head.std() * spec.hidden ** 0.5))
    return model.eval()


def build_policy(out: Path, preset: E2EPreset, device: str, seed: int = 0) -> tuple[Path, Path, Path]:
    """(checkpoint dir, adapter dir, prompt file) of the synthetic policy under ``out``."""
    from peft import LoraConfig, get_peft_model

    spec = preset.model
    model = build_model(spec, device, seed)
    eos = spec.vocab - 1
    with torch.no_grad():
        model.get_output_embeddings().weight[eos].zero_()  # the EOS logit is 0: outside the nucleus
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, spec.vocab - 2
    checkpoint, adapter = out / "checkpoint", out / "adapter"
    model.save_pretrained(checkpoint)
    tokenizer = build_tokenizer(spec.vocab)
    tokenizer.save_pretrained(checkpoint)
    lora = LoraConfig(r=preset.lora_rank, lora_alpha=2 * preset.lora_rank, lora_dropout=0.0, bias="none",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lora)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():  # as after some training: B ≠ 0, so the adapter changes the logits
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(1e-3 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(adapter)
    (out / "reward.py").write_text(REWARD)
    g = torch.Generator().manual_seed(seed + 2)
    prompts = out / "prompts.jsonl"
    with open(prompts, "w") as f:
        for _ in range(preset.prompts):
            n = int(torch.randint(preset.prompt_words // 2, preset.prompt_words + 1, (), generator=g))
            words = torch.randint(0, spec.vocab - 2, (n + 1,), generator=g).tolist()
            f.write(json.dumps({"prompt": " ".join(f"w{w}" for w in words[:-1]), "answer": f"w{words[-1]}"}) + "\n")
    del model, peft_model
    return checkpoint, adapter, prompts


def write_config(work: Path, preset: E2EPreset, checkpoint: Path, adapter: Path, prompts: Path) -> Path:
    import yaml

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["model"] |= {"name_or_path": str(checkpoint), "adapter_path": str(adapter), "trainable": "adapters"}
    config["data"] |= {"source": str(prompts), "split": "train"}
    config["reward"] |= {"name": "custom", "function": f"{prompts.parent / 'reward.py'}:reward"}
    config["estimator"] |= {"eta_list": ETAS, "central_difference": True}
    for section, values in preset.overrides.items():
        config[section] |= values
    path = work / "e2e.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def stage_table(results: Path) -> list[dict]:
    """One row per rule from ``results/benchmarks/*.tsv`` (one file per job): jobs, wall seconds
    (sum and slowest job), CPU seconds, peak resident memory (MiB) and, where the stage logged
    it, peak CUDA memory (GiB)."""
    rows: dict[str, dict] = {}
    for path in sorted((results / "benchmarks").glob("*.tsv")):
        job = path.stem
        rule = re.sub(r"(_[EUXY]|_-?\d[\d.e+-]*)?(_\d{3})?$", "", job)  # batch, η and shard of the job
        with open(path) as f:
            record = next(csv.DictReader(f, delimiter="\t"))
        row = rows.setdefault(rule, {"stage": rule, "jobs": 0, "wall_s": 0.0, "slowest_job_s": 0.0, "cpu_s": 0.0,
                                     "max_rss_mib": 0.0, "peak_cuda_gib": None})
        wall = float(record["s"])
        row["jobs"] += 1
        row["wall_s"] += wall
        row["slowest_job_s"] = max(row["slowest_job_s"], wall)
        row["cpu_s"] += float(record.get("cpu_time") or 0)
        row["max_rss_mib"] = max(row["max_rss_mib"], float(record.get("max_rss") or 0))
        log = results / "logs" / f"{job}.log"
        if log.is_file():
            found = re.findall(r"peak CUDA memory ([\d.]+) GiB", log.read_text())
            if found:
                row["peak_cuda_gib"] = max(float(found[-1]), row["peak_cuda_gib"] or 0.0)
    return list(rows.values())


def check_stop_reasons(results: Path) -> dict:
    from entropy_probe import shards, stopping

    counts: dict[str, int] = {}
    for path in sorted((results / "rollouts").rglob("shard_*.safetensors")):
        tensors, _ = shards.read_shard(path)
        for code, name in stopping.STOP_REASONS.items():
            counts[name] = counts.get(name, 0) + int((tensors["stop_reason"] == code).sum())
    return counts


def disk_usage(results: Path) -> dict[str, int]:
    """Bytes under each top-level directory of ``results`` (what the run leaves on disk)."""
    usage = {}
    for child in sorted(results.iterdir()):
        files = [child] if child.is_file() else [p for p in child.rglob("*") if p.is_file()]
        usage[child.name] = sum(p.stat().st_size for p in files)
    return usage


def run(size: str, cores: int, keep: str | None = None) -> dict:
    preset = E2E_PRESETS[size]
    device = preset.overrides["model"]["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--e2e --gpu needs a CUDA device")
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="e2e_"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    checkpoint, adapter, prompts = build_policy(work / "policy_files", preset, device)
    build_s = time.perf_counter() - start
    config = write_config(work, preset, checkpoint, adapter, prompts)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(config), "--cores", str(cores), "-q"]
    if device == "cuda":
        cmd += ["--resources", "gpu=1"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    results = work / "results"
    out = {
        "size": size, "model": preset.model.name, "workflow_wall_s": wall, "build_policy_files_s": build_s,
        "stages": stage_table(results), "stop_reasons": check_stop_reasons(results), "disk_bytes": disk_usage(results),
        "config": {k: v for k, v in preset.overrides.items()} | {"estimator": {"eta_list": ETAS, "central_difference": True}},
        "lora_rank": preset.lora_rank, "summary_table": (results / "summary.txt").read_text(), "workdir": str(work),
        "cost_account": json.loads((results / "summary.json").read_text())["cost"],
    }
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return out


def print_table(report: dict) -> None:
    print(f"\nwhole workflow ({report['size']}: {report['model']}, LoRA r = {report['lora_rank']}): "
          f"{report['workflow_wall_s']:.0f} s wall (policy files built in {report['build_policy_files_s']:.0f} s)")
    print(f"  {'stage':<18} {'jobs':>4} {'wall s':>9} {'slowest':>9} {'CPU s':>9} {'max RSS MiB':>12} {'CUDA GiB':>9}")
    for r in report["stages"]:
        cuda = "-" if r["peak_cuda_gib"] is None else f"{r['peak_cuda_gib']:.1f}"
        print(f"  {r['stage']:<18} {r['jobs']:>4} {r['wall_s']:>9.1f} {r['slowest_job_s']:>9.1f} {r['cpu_s']:>9.1f} "
              f"{r['max_rss_mib']:>12.0f} {cuda:>9}")
    print("\n  the model jobs' cost account (summary.json \"cost\"; share: of the model jobs' seconds)")
    print("".join(f"  {line}\n" for line in job_cost.format_account(report["cost_account"]).splitlines()), end="")
    print(f"  stop reasons: {report['stop_reasons']}")
    print("  disk: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in report["disk_bytes"].items()))
