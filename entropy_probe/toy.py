"""The embedded default: a tiny arithmetic policy built and trained on the CPU from a seed.

Prompts are ``a+b=`` (0 <= a, b <= max_operand), the answer is the decimal sum followed by EOS,
the reward is exact match. The vocabulary (digits, '+', '=', EOS, PAD) and the answer length
(<= 3 tokens with EOS) are small enough to enumerate every response exactly (DESIGN §2, "Ground
truth"). Training stops as soon as the exact expected reward under the model (τ = 1, top-p = 1)
reaches ``target_accuracy``, so sampled answers are right about that often and rewards vary
within groups; the AdamW state of the last steps is saved for the AdamW update path.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .input_files import NAMES_FILE, PROMPTS_FILE, STATE_FILE

log = logging.getLogger(__name__)

DIGITS = [str(d) for d in range(10)]
EOS, PAD = "<eos>", "<pad>"
VOCAB = DIGITS + ["+", "=", EOS, PAD]


def build_tokenizer():
    """A character-level WordLevel tokenizer (Fuse decoder, so decoding inserts no spaces)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d|\+|="), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS, pad_token=PAD, padding_side="left"
    )


def build_model(seed: int, hidden_size: int = 48, num_layers: int = 2):
    """A tiny Llama. No ``pad_token_id`` in the model config: HF would give that embedding row a
    ``padding_idx`` and drop its gradient (the tokenizer and the generation settings still pad)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        eos_token_id=VOCAB.index(EOS),
        bos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def arithmetic_examples(max_operand: int) -> list[dict]:
    """Every ``a+b=`` prompt with its gold answer, in a fixed order (the dataset index)."""
    return [
        {"prompt": f"{a}+{b}=", "answer": str(a + b)}
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
    ]


def _training_batch(tokenizer, examples):
    """Left-padded prompt+answer+EOS sequences, with a loss mask on the answer tokens."""
    prompts = tokenizer([e["prompt"] for e in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([e["answer"] for e in examples], add_special_tokens=False)["input_ids"]
    rows = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    answer_mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, row) in enumerate(zip(prompts, rows)):
        ids[i, width - len(row):] = torch.tensor(row)
        attention[i, width - len(row):] = 1
        answer_mask[i, width - len(row) + len(p):] = True
    return ids, attention, answer_mask


def _answer_log_likelihood(model, ids, attention, answer_mask):
    """Per-example Σ log π(answer tokens incl. EOS), ``[N]``: log of the exact reward probability
    under τ = 1, top-p = 1."""
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_lp = log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_lp * answer_mask[:, 1:]).sum(-1)


def _param_groups(model, weight_decay: float):
    """Two groups as trainers build them: matrices decay, norms and biases do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name else decay).append((name, param))
    return [
        {"names": [n for n, _ in decay], "params": [p for _, p in decay], "weight_decay": weight_decay},
        {"names": [n for n, _ in no_decay], "params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]


def build_embedded_policy(
    out_dir: str | Path,
    seed: int = 0,
    max_operand: int = 19,
    target_accuracy: float = 0.5,
    max_steps: int = 2000,
    learning_rate: float = 3e-3,
    weight_decay: float = 0.01,
) -> dict:
    """Build, train and save the embedded policy; returns a small report (also saved as JSON).

    Writes a Hugging Face checkpoint dir (config, ``model.safetensors``, tokenizer), the prompt set
    (``prompts.jsonl``), the AdamW state (``optimizer.pt``, loadable with ``weights_only=True``)
    and the parameter names of each optimizer group (``optimizer_param_names.json``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = build_model(seed)
    examples = arithmetic_examples(max_operand)
    ids, attention, answer_mask = _training_batch(tokenizer, examples)

    groups = _param_groups(model, weight_decay)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups], lr=learning_rate
    )
    accuracy = 0.0
    for step in range(1, max_steps + 1):
        model.train()
        optimizer.zero_grad()
        answer_ll = _answer_log_likelihood(model, ids, attention, answer_mask)
        loss = -answer_ll.sum() / answer_mask.sum()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            model.eval()
            with torch.no_grad():
                accuracy = _answer_log_likelihood(model, ids, attention, answer_mask).exp().mean().item()
            log.info("toy training step %d: loss %.4f, exact expected accuracy %.3f", step, loss.item(), accuracy)
            if accuracy >= target_accuracy:
                break
    else:
        raise RuntimeError(
            f"embedded policy reached exact accuracy {accuracy:.3f} < target {target_accuracy} "
            f"after {max_steps} steps; raise toy.max_steps or lower toy.target_accuracy"
        )
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    torch.save(optimizer.state_dict(), out_dir / STATE_FILE)
    (out_dir / NAMES_FILE).write_text(json.dumps([g["names"] for g in groups], indent=1))
    with open(out_dir / PROMPTS_FILE, "w") as f:
        for example in examples:
            f.write(json.dumps(example) + "\n")
    report = {"steps": step, "exact_expected_accuracy": accuracy, "num_prompts": len(examples)}
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=1))
    return report
