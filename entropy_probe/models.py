"""Loading the policy and its tokenizer, device and precision settings, model fingerprints."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
_FINGERPRINT_FILES = ("*.safetensors", "*.bin", "config.json", "tokenizer.json", "tokenizer_config.json")


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def set_precision() -> None:
    """fp32 matmuls at full precision: TF32 off (DESIGN §2 "Precision")."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def fingerprint(model_dir: str | Path) -> str:
    """sha256 over the checkpoint's weight, config and tokenizer files (names and contents)."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    files = sorted({p for pattern in _FINGERPRINT_FILES for p in model_dir.glob(pattern)})
    if not files:
        raise FileNotFoundError(f"{model_dir}: no weight or config files to fingerprint")
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def load_tokenizer(model_dir: str | Path):
    """Left-padding tokenizer (generation needs it); EOS and pad must be defined."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{model_dir}: the tokenizer defines no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad ids are always masked, never scored
    return tokenizer


def load_policy(model_dir: str | Path, dtype: str = "float32", device: str = "auto"):
    """The policy in eval mode (dropout off, so gradients are deterministic) on ``device``."""
    from transformers import AutoModelForCausalLM

    set_precision()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_DTYPES[dtype])
    config = model.config
    for unsupported in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, unsupported, None):
            raise ValueError(
                f"{model_dir}: config.{unsupported} is set; teacher forcing applies the output "
                "embedding directly and does not reproduce it"
            )
    model.eval()
    return model.to(pick_device(device))
