"""Prompt datasets: the embedded arithmetic set or a local jsonl file."""
from __future__ import annotations

import json
from pathlib import Path

from .config import EMBEDDED
from .toy import PROMPTS_FILE


def dataset_path(data: dict, policy_dir: str | Path) -> Path:
    """Where the prompts live: next to the embedded policy, or the configured file."""
    return Path(policy_dir) / PROMPTS_FILE if data["source"] == EMBEDDED else Path(data["source"])


def load_examples(path: str | Path, prompt_field: str, answer_field: str) -> list[dict]:
    """Records ``{"prompt", "answer"}`` in file order (the index is the prompt id). A record
    without the prompt field, or with an empty prompt, is an error naming the line."""
    examples = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            prompt = record.get(prompt_field)
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{path}:{line_no}: field {prompt_field!r} (data.prompt_field) is missing or empty")
            examples.append({"prompt": prompt, "answer": record.get(answer_field)})
    return examples
