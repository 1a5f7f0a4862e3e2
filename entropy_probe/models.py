"""Loading the policy and its tokenizer, device and precision settings, model fingerprints.

A *policy* argument is either a checkpoint directory (the embedded policy, or any local Hugging
Face checkpoint) or a **policy spec**: the small JSON file the workflow writes for a configured
model (``results/policy.json``, :func:`resolve_spec`). The spec names the resolved checkpoint
directory (a local path, or the local snapshot of a hub id), the optional PEFT adapter, whether
remote code is trusted, and the fingerprint of all those files. Which parameters are trainable is
not part of the spec (``model.trainable`` is a setting of the stages that differentiate, given to
:func:`load_policy`), so changing it leaves the rollouts alone.

**Adapters.** With ``model.adapter_path`` the policy is ``peft.PeftModel.from_pretrained(base,
adapter, is_trainable=True)`` in eval mode (LoRA dropout off, so gradients are deterministic).
Parameter names are then PEFT's, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` (the frozen base
weight of that layer is ``...q_proj.base_layer.weight``): X, Y, v and an optimizer state's names
file all use these names. ``model.trainable`` picks which parameters count
(:mod:`entropy_probe.trainable`).

**Trainer checkpoints** (``model.checkpoint``): the spec records the checkpoint; an FSDP sharded
one (DCP folders, no config.json) is ``model.name_or_path``'s architecture with the weights of its
``pytorch_model_fsdp_0/`` (``sharded_dir``, read by :mod:`entropy_probe.dcp_files`).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from . import dcp_files
from .errors import ProbeError
from .input_files import adapter_files, checkpoint_files, looks_like_hub_id
from .trainable import set_trainable, trainable_mode
from .trainer_checkpoint import policy_sources
from .trainer_files import FSDP_MODEL_DIR

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.py", "*.tiktoken", "*.jinja"]
SPEC_KIND = "policy_spec"


class PolicyLoadError(RuntimeError, ProbeError):
    """A model or adapter that cannot be found, fetched or loaded."""


def pick_device(requested: str = "auto") -> torch.device:
    """model.device for this job. Checked here, in the job, not when the workflow parses its
    config: on a cluster the scheduler's host often has no GPU while the jobs' nodes do. With
    several visible GPUs (a workstation running ``snakemake --cores N --resources gpu=K``) the
    job takes one no other job of this host holds (:func:`claim_gpu`)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        import socket

        raise PolicyLoadError(f"model.device: 'cuda' requested but this job (host {socket.gethostname()}) sees no "
                              "CUDA device (on a cluster: does the profile give this rule gpu: 1?)")
    if requested != "cuda" or torch.cuda.device_count() == 1:
        return torch.device(requested)
    index = claim_gpu([str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())])
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


_CLAIMED: dict[str, object] = {}  # the lock file this process holds, open until it exits


def claim_gpu(gpu_ids: list[str], lock_dir: str | Path | None = None, poll_seconds: float = 2.0) -> int:
    """Index of the first GPU (by its UUID in ``gpu_ids``) whose lock file this process can take,
    waiting while every one is taken. The lock (``flock`` on ``<lock_dir>/entropy-probe-gpu-<uuid>.lock``,
    default lock dir: the system temp dir, or ENTROPY_PROBE_GPU_LOCK_DIR) is held until the process
    exits, so the OS releases it even after a kill. Snakemake's ``--resources gpu=K`` bounds how
    many jobs want one at a time; this picks which."""
    import fcntl
    import os
    import tempfile
    import time

    if "gpu" in _CLAIMED:
        return _CLAIMED["gpu"]
    lock_dir = Path(lock_dir or os.environ.get("ENTROPY_PROBE_GPU_LOCK_DIR") or tempfile.gettempdir())
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index, gpu_id in enumerate(gpu_ids):
            handle = open(lock_dir / f"entropy-probe-gpu-{gpu_id}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            _CLAIMED.update(gpu=index, handle=handle)
            log.info("using GPU %d (%s)", index, gpu_id)
            return index
        if not waited:
            log.info("all %d GPUs are held by other jobs of this host; waiting for one", len(gpu_ids))
            waited = True
        time.sleep(poll_seconds)


def set_precision() -> None:
    """fp32 matmuls at full precision: TF32 off (DESIGN §2 "Precision")."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


# --------------------------------------------------------------------- checkpoints and the spec


def resolve_checkpoint(name_or_path: str, key: str, adapter: bool = False) -> Path:
    """A local directory for ``name_or_path``: the directory itself, or the local snapshot of a
    hub id (downloaded here, or found in the Hugging Face cache). Anything that fails is a
    :class:`PolicyLoadError` naming the config key."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if not looks_like_hub_id(name_or_path):
        raise PolicyLoadError(f"{key}: {name_or_path!r} is not an existing directory")
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(name_or_path, allow_patterns=_HUB_PATTERNS))
        if not adapter and not list(snapshot.glob("*.safetensors")):
            snapshot = Path(snapshot_download(name_or_path, allow_patterns=_HUB_PATTERNS + ["*.bin"]))
    except Exception as err:
        raise PolicyLoadError(
            f"{key}: {name_or_path!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(err).__name__}: {err}). Check the id and the network (or HF_TOKEN for gated models), or "
            "download it first (huggingface-cli download ...) and give the local path") from err
    return snapshot


def _hash(entries: list[tuple[str, Path]]) -> str:
    """sha256 over (label, contents) of the files, in order."""
    digest = hashlib.sha256()
    for label, path in entries:
        digest.update(label.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _entries(model_dir: Path, adapter_dir: Path | None, sharded_dir: Path | None = None) -> list[tuple[str, Path]]:
    entries = [(p.name, p) for p in checkpoint_files(model_dir)]
    if sharded_dir is not None:  # the weights: the architecture's own weight files define nothing
        entries = [(name, p) for name, p in entries if not name.endswith((".safetensors", ".bin"))]
        entries += [(f"{FSDP_MODEL_DIR}/{p.name}", p) for p in sorted(sharded_dir.iterdir()) if p.is_file()]
    if not entries:
        raise FileNotFoundError(f"{model_dir}: no weight or config files to fingerprint")
    if adapter_dir is not None:
        adapter = adapter_files(adapter_dir)
        if not any(p.name.startswith("adapter_model") for p in adapter):
            raise PolicyLoadError(f"model.adapter_path: {adapter_dir} has no adapter_model.safetensors / .bin")
        entries += [(f"adapter/{p.name}", p) for p in adapter]
    return entries


def _stats(entries: list[tuple[str, Path]]) -> list[list]:
    return [[label, str(path), path.stat().st_size, path.stat().st_mtime_ns] for label, path in entries]


def resolve_spec(model_cfg: dict) -> dict:
    """The policy spec of the configured model (and adapter), or of the trainer checkpoint
    ``model.checkpoint``: the resolved directories (a hub id fetched here) and the fingerprint of
    their files."""
    if model_cfg.get("checkpoint"):
        model_source, adapter_source, model_key, trained = policy_sources(model_cfg)
    else:
        model_source, adapter_source, trained = model_cfg["name_or_path"], model_cfg.get("adapter_path", ""), None
        model_key = "model.name_or_path"
    model_dir = resolve_checkpoint(model_source, model_key).resolve()
    adapter_dir = None
    if adapter_source:
        adapter_dir = resolve_checkpoint(adapter_source, "model.adapter_path", adapter=True).resolve()
        if not (adapter_dir / "adapter_config.json").is_file():
            raise PolicyLoadError(f"model.adapter_path: {adapter_dir} has no adapter_config.json (not a PEFT adapter)")
    sharded_dir = Path(trained["path"]) / FSDP_MODEL_DIR if trained and trained["kind"] == "sharded" else None
    entries = _entries(model_dir, adapter_dir, sharded_dir)
    return {
        "kind": SPEC_KIND,
        "name_or_path": model_source,
        "adapter_path": adapter_source,
        "checkpoint": trained,
        "model_dir": str(model_dir),
        "adapter_dir": str(adapter_dir) if adapter_dir else "",
        "sharded_dir": str(sharded_dir) if sharded_dir else "",
        "trust_remote_code": bool(model_cfg.get("trust_remote_code", False)),
        "fingerprint": _hash(entries),
        "files": _stats(entries),
    }


def read_spec(policy: str | Path) -> dict:
    """The spec of a policy argument (a checkpoint directory, or a hub id when running a stage by
    hand, reads as a spec without adapter; a spec dict is itself)."""
    if isinstance(policy, dict):
        return policy
    if not Path(policy).exists() and looks_like_hub_id(str(policy)):
        policy = resolve_checkpoint(str(policy), "policy")
    policy = Path(policy)
    if policy.is_dir():
        return {"kind": SPEC_KIND, "model_dir": str(policy), "adapter_dir": "", "trust_remote_code": False,
                "name_or_path": str(policy), "adapter_path": ""}
    try:
        spec = json.loads(policy.read_text())
    except (OSError, ValueError) as err:
        raise PolicyLoadError(f"{policy}: neither a checkpoint directory nor a readable policy spec ({err})") from err
    if not isinstance(spec, dict) or spec.get("kind") != SPEC_KIND:
        raise PolicyLoadError(f"{policy}: not a policy spec (written by the policy_spec stage)")
    return spec


def fingerprint(policy: str | Path) -> str:
    """sha256 over the checkpoint's weight, config and tokenizer files (names and contents), and
    the adapter's files when there is one. For a spec, the recorded value while every file keeps
    its size and modification time; a changed file is hashed again, and a changed model is an
    error (the run's earlier outputs belong to the old one)."""
    spec = read_spec(policy)
    adapter_dir = Path(spec["adapter_dir"]) if spec["adapter_dir"] else None
    sharded_dir = Path(spec["sharded_dir"]) if spec.get("sharded_dir") else None
    entries = _entries(Path(spec["model_dir"]), adapter_dir, sharded_dir)
    if "files" not in spec:  # a checkpoint directory
        return _hash(entries)
    if _stats(entries) == spec["files"]:
        return spec["fingerprint"]
    now = _hash(entries)
    if now != spec["fingerprint"]:
        raise PolicyLoadError(f"{policy}: the checkpoint or adapter files changed since the spec was written "
                              f"(fingerprint {spec['fingerprint']} -> {now}); rerun the workflow from policy_spec")
    return now


# ---------------------------------------------------------------------------------------- loading


def load_tokenizer(policy: str | Path):
    """Left-padding tokenizer (generation needs it); EOS and pad must be defined. With an adapter
    that saved its own tokenizer, that one (trainers save it with the adapter)."""
    from transformers import AutoTokenizer

    spec = read_spec(policy)
    source = spec["model_dir"]
    if spec["adapter_dir"] and (Path(spec["adapter_dir"]) / "tokenizer_config.json").is_file():
        source = spec["adapter_dir"]
    tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left", trust_remote_code=spec["trust_remote_code"])
    if tokenizer.eos_token_id is None:
        raise PolicyLoadError(f"{source}: the tokenizer defines no EOS token (set eos_token in its tokenizer_config.json)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad ids are always masked, never scored
    return tokenizer


def load_policy(policy: str | Path, dtype: str = "float32", device: str = "auto", trainable: str = "auto"):
    """The policy (with its adapter, if any) in eval mode (dropout off, so gradients are
    deterministic) on ``device``, trainable parameters per ``trainable`` (``model.trainable``:
    :func:`trainable_mode`)."""
    from transformers import AutoModelForCausalLM

    set_precision()
    spec = read_spec(policy)
    try:
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=_DTYPES[dtype],
                                                     trust_remote_code=spec["trust_remote_code"])
    except Exception as err:
        raise PolicyLoadError(f"{spec['model_dir']}: cannot load the model ({type(err).__name__}: {err})") from err
    if spec.get("sharded_dir"):
        dcp_files.load_model_weights(model, spec["sharded_dir"])
    config = model.config
    for unsupported in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, unsupported, None):
            raise ValueError(
                f"{spec['model_dir']}: config.{unsupported} is set; teacher forcing applies the output "
                "embedding directly and does not reproduce it"
            )
    if spec["adapter_dir"]:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, spec["adapter_dir"], is_trainable=True)
        except Exception as err:
            raise PolicyLoadError(f"model.adapter_path {spec['adapter_dir']}: cannot load the PEFT adapter onto "
                                  f"{spec['model_dir']} ({type(err).__name__}: {err})") from err
        if dtype != "bfloat16":
            model = model.to(_DTYPES[dtype])  # bf16: PEFT keeps the adapter in fp32, as trainers do
    set_trainable(model, trainable_mode(trainable, bool(spec["adapter_dir"])), str(policy))
    model.eval()
    return model.to(pick_device(device))
