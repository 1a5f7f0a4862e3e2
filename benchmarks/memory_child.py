"""One peak-memory measurement in a fresh process (called by run.py; prints one JSON line).

    python benchmarks/memory_child.py {x,y,plain} SPEC --seqs N --prompt P --response T [--device cpu]
                                      [--chunk-tokens C] [--threads K]

Builds the model and the inputs first, then measures the peak *increase* over that state while
one pass runs: on the CPU the resident set's high-water mark (reset through
``/proc/self/clear_refs``; a 1 ms sampling thread where that is not allowed), on CUDA
``torch.cuda.max_memory_allocated``. ``plain`` is the model's own forward + backward with a
cross-entropy loss on the response tokens (``labels``), the reference the X pass is held to.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # workloads; the package, also when not pip-installed
import workloads  # noqa: E402

from entropy_probe import models, parameters, passes, tf_layout  # noqa: E402


def rss_bytes(field: str) -> int:
    text = open("/proc/self/status").read()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) * 1024


class CpuPeak:
    """Peak resident-set increase over the state at construction."""

    def __init__(self):
        gc.collect()
        self.base = rss_bytes("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.sampler = None
        except OSError:
            self.samples, self.stop = [self.base], False
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()

    def _sample(self):
        while not self.stop:
            self.samples.append(rss_bytes("VmRSS"))
            time.sleep(0.001)

    def increase(self) -> int:
        if self.sampler is None:
            return rss_bytes("VmHWM") - self.base
        self.stop = True
        self.sampler.join()
        return max(self.samples) - self.base


class CudaPeak:
    def __init__(self):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def increase(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


def plain_forward_backward(model, rollout, device):
    """The model's own forward + backward: cross-entropy on the response tokens, padded batch."""
    B, G, L = rollout["sequences"].shape
    ids = rollout["sequences"].reshape(B * G, L).to(device)
    mask = rollout["attention_masks"].reshape(B * G, L).to(device)
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, : L - rollout["token_log_q"].shape[-1]] = -100  # score the response tokens only
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()


def measure(mode: str, spec_name: str, seqs: int, prompt: int, response: int, device: str,
            chunk_tokens: int | None, G: int = 4) -> dict:
    models.set_precision()
    spec = workloads.SIZES[spec_name]
    model = workloads.build_qwen2(spec, device)
    rollout = workloads.synthetic_rollout(model, B=max(1, seqs // G), G=G, P=prompt, T=response, seed=0)
    params = parameters.select(model)
    pad = spec.vocab - 2
    peak = CudaPeak() if device.startswith("cuda") else CpuPeak()
    start = time.perf_counter()
    if mode == "x":
        passes.x_gradient(model, params, rollout, pad_token_id=pad, temperature=1.0, top_p=1.0, H_bar=1.0,
                          normalization="token", baseline="loo", pathwise_term=True, tf_batch_size=seqs,
                          chunk_tokens=chunk_tokens)
    elif mode == "y":
        passes.y_gradient(model, params, rollout, workloads.grpo_numerators(rollout), pad_token_id=pad, temperature=1.0,
                          tf_batch_size=seqs, chunk_tokens=chunk_tokens)
    elif mode == "plain":
        plain_forward_backward(model, rollout, device)
    else:
        raise ValueError(mode)
    increase = peak.increase()
    seconds = time.perf_counter() - start
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"mode": mode, "spec": spec_name, "seqs": seqs, "prompt": prompt, "response": response,
            "peak_increase_bytes": increase, "param_bytes": param_bytes, "seconds": seconds,
            "chunk_tokens": chunk_tokens or tf_layout.DEFAULT_CHUNK_TOKENS}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["x", "y", "plain"])
    parser.add_argument("spec", choices=sorted(workloads.SIZES))
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.mode, args.spec, args.seqs, args.prompt, args.response, args.device,
                             args.chunk_tokens)))
