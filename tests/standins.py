"""Local stand-ins for what the docs' recipes download or train, so that the recipes run verbatim
on a CPU machine without a network (docs/development.md, "Recipes and their stand-ins").

The substitution is one rule: **whatever a recipe names by a hub id or a path is created at that
path, relative to the working directory the recipe runs in.** The probe reads a local directory
before it asks the hub (``model.name_or_path``, ``data.source``), so a recipe that names
``Qwen/Qwen2.5-1.5B-Instruct`` reads ``./Qwen/Qwen2.5-1.5B-Instruct/``. What stands in for what:

- ``Qwen/Qwen2.5-1.5B-Instruct``: the embedded tiny policy with a chat template that renders the
  first line of the user's message followed by ``=`` (the tiny policy answers ``a+b=``);
- ``openai/gsm8k``: a dataset repository in GSM8K's layout (configuration ``main``, splits
  ``train`` and ``test`` as parquet files, fields ``question`` and ``answer`` with ``#### <n>``)
  holding the tiny policy's arithmetic prompts;
- ``trl_out/``: a real TRL ``GRPOTrainer`` run of two steps training a LoRA adapter on the
  ``Qwen/Qwen2.5-1.5B-Instruct`` stand-in (``tests/trl_harness.py``), a checkpoint after each;
- ``checkpoints/grpo-gsm8k/checkpoint-500``: that run's last checkpoint (an adapter with its
  ``optimizer.pt``, ``scheduler.pt`` and ``trainer_state.json``).
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
DATASET = "openai/gsm8k"
TRL_RUN = "trl_out"
CHECKPOINT = "checkpoints/grpo-gsm8k/checkpoint-500"
TRL_STEPS = 2

# The first line of each user message, then "=": the tiny policy's prompt format ("3+4=").
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                 "{{ message['content'].split('\\n')[0] }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}={% endif %}")


@contextmanager
def working_directory(path: Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def make_model(root: Path, policy_dir: Path) -> Path:
    """``root/Qwen/Qwen2.5-1.5B-Instruct``: a copy of the trained embedded policy ``policy_dir``
    with a chat template."""
    from transformers import AutoTokenizer

    out = root / MODEL
    shutil.copytree(policy_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def make_dataset(root: Path, policy_dir: Path) -> Path:
    """``root/openai/gsm8k``: the arithmetic prompts as a GSM8K-shaped dataset repository (every
    third prompt in ``test``, the others in ``train``)."""
    import json

    import datasets

    out = root / DATASET
    rows = [json.loads(line) for line in (policy_dir / "prompts.jsonl").read_text().splitlines()]
    shaped = [{"question": row["prompt"].rstrip("="), "answer": f"The sum is {row['answer']}.\n#### {row['answer']}"}
              for row in rows]
    for split, part in (("train", [r for i, r in enumerate(shaped) if i % 3]),
                        ("test", [r for i, r in enumerate(shaped) if not i % 3])):
        (out / "main").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(part).to_parquet(str(out / "main" / f"{split}-00000-of-00001.parquet"))
    (out / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
        "  - split: test\n    path: main/test-*\n---\nA stand-in for openai/gsm8k (tests/standins.py).\n")
    return out


def make_trl_run(root: Path) -> Path:
    """``root/trl_out``: two real GRPOTrainer steps training a LoRA adapter on the model stand-in,
    run from ``root`` so that the adapter names its base by the hub id, as a real run does."""
    from peft import LoraConfig
    from trl_harness import run_training

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none")
    with working_directory(root):
        run_training(MODEL, TRL_RUN, max_steps=TRL_STEPS, peft_config=lora, learning_rate=1e-3)
    return root / TRL_RUN


def make_all(root: Path, policy_dir: Path) -> None:
    """Every stand-in, under ``root``."""
    make_model(root, policy_dir)
    make_dataset(root, policy_dir)
    run = make_trl_run(root)
    make_checkpoint(root, run / f"checkpoint-{TRL_STEPS}")


def make_checkpoint(root: Path, source: Path) -> Path:
    """``root/checkpoints/grpo-gsm8k/checkpoint-500``: a copy of ``source`` renumbered to its name
    (trainer_state.json's global_step and logged steps: the probe checks them against the name)."""
    import json

    out = root / CHECKPOINT
    shutil.copytree(source, out)
    step = int(out.name.rsplit("-", 1)[1])
    state = json.loads((out / "trainer_state.json").read_text())
    shift = step - state["global_step"]
    state["global_step"] = step
    for entry in state.get("log_history", []):
        if "step" in entry:
            entry["step"] += shift
    (out / "trainer_state.json").write_text(json.dumps(state, indent=2))
    return out
